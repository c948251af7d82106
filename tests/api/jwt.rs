//! `auth.frontend = jwt`: bearer JWTs verified locally (HS256, RS256, ES256; exp, nbf, aud,
//! iss), no origin round trip for a valid token on a cached entry.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use crate::helpers::{TestApp, assert_error, header, spawn_app_with};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

fn token(alg: Algorithm, key: &EncodingKey, claims: Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), &claims, key).expect("encode")
}

async fn get_with(app: &TestApp, jwt: Option<&str>) -> reqwest::Response {
    let mut req = app.client.get(app.url("/api/v1/models/train/7/metrics"));
    if let Some(t) = jwt {
        req = req.bearer_auth(t);
    }
    req.send().await.expect("request")
}

#[tokio::test]
async fn hs256_tokens_are_verified_locally() {
    let app = spawn_app_with(None, |s| {
        s.auth.frontend = "jwt".into();
        s.auth.jwt_secret = Some(secrecy::SecretString::from("jwt-test-secret"));
        s.auth.jwt_audience = Some("ml-platform".into());
        s.auth.jwt_issuer = Some("https://auth.example".into());
    })
    .await;
    let key = EncodingKey::from_secret(b"jwt-test-secret");
    let claims = |exp: i64, nbf: i64, aud: &str| json!({"sub": "u1", "exp": exp, "nbf": nbf, "aud": aud, "iss": "https://auth.example"});
    let good = token(
        Algorithm::HS256,
        &key,
        claims(now() + 600, now() - 10, "ml-platform"),
    );
    assert_eq!(
        header(&get_with(&app, Some(&good)).await, "x-cache"),
        "MISS"
    );
    let other_user = token(
        Algorithm::HS256,
        &key,
        json!({"sub": "u2", "exp": now() + 600, "aud": "ml-platform", "iss": "https://auth.example"}),
    );
    assert_eq!(
        header(&get_with(&app, Some(&other_user)).await, "x-cache"),
        "HIT",
        "no origin round trip"
    );
    assert_eq!(app.origin.calls("/api/v1/models/train/7/metrics"), 1);

    let refused = [
        (
            "expired",
            token(
                Algorithm::HS256,
                &key,
                claims(now() - 60, now() - 600, "ml-platform"),
            ),
        ),
        (
            "not yet valid",
            token(
                Algorithm::HS256,
                &key,
                claims(now() + 600, now() + 300, "ml-platform"),
            ),
        ),
        (
            "wrong audience",
            token(
                Algorithm::HS256,
                &key,
                claims(now() + 600, now() - 10, "someone-else"),
            ),
        ),
        (
            "wrong key",
            token(
                Algorithm::HS256,
                &EncodingKey::from_secret(b"other"),
                claims(now() + 600, now() - 10, "ml-platform"),
            ),
        ),
        (
            "no exp",
            token(
                Algorithm::HS256,
                &key,
                json!({"sub": "u1", "aud": "ml-platform", "iss": "https://auth.example"}),
            ),
        ),
        ("tampered", {
            let mut t = good.clone();
            t.replace_range(t.len() - 3.., "AAA");
            t
        }),
        ("garbage", "not.a.jwt".to_owned()),
    ];
    for (why, jwt) in refused {
        let resp = get_with(&app, Some(&jwt)).await;
        assert_eq!(resp.status(), 401, "{why}");
        assert_error(resp, 401, "unauthorized").await;
    }
    assert_error(get_with(&app, None).await, 401, "unauthorized").await;
    assert_eq!(
        app.origin.calls("/api/v1/models/train/7/metrics"),
        1,
        "refusals never reach the origin"
    );
}

#[tokio::test]
async fn rs256_and_es256_tokens_verify_with_public_keys() {
    for (alg, name) in [(Algorithm::RS256, "rs256"), (Algorithm::ES256, "es256")] {
        let public = format!("{FIXTURES}/jwt-{name}-public.pem");
        let private = std::fs::read(format!("{FIXTURES}/jwt-{name}-private.pem")).expect("fixture");
        let app = spawn_app_with(None, |s| {
            s.auth.frontend = "jwt".into();
            s.auth.jwt_algorithm = name.to_uppercase();
            s.auth.jwt_public_key_path = Some(public.clone());
        })
        .await;
        let key = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&private),
            _ => EncodingKey::from_ec_pem(&private),
        }
        .expect("private key");
        let good = token(alg, &key, json!({"sub": "u", "exp": now() + 600}));
        assert_eq!(get_with(&app, Some(&good)).await.status(), 200, "{name}");
        let hs = token(
            Algorithm::HS256,
            &EncodingKey::from_secret(b"x"),
            json!({"sub": "u", "exp": now() + 600}),
        );
        assert_error(get_with(&app, Some(&hs)).await, 401, "unauthorized").await;
    }
}

#[test]
fn a_jwt_mode_without_a_key_stops_the_start() {
    let mut env = std::collections::HashMap::new();
    env.insert("RUNCACHE__AUTH__FRONTEND".to_owned(), "jwt".to_owned());
    let err = runcache::config::Settings::load_from(None, Some(env)).expect_err("no key");
    assert!(err.to_string().contains("jwt"), "{err}");
}
