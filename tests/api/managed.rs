//! Managed Redis: an ACL user limited to runcache's own keys, and TLS (`rediss://`) to a
//! `redis-server` with a certificate authority made at test time.

use crate::helpers::{TestApp, TestRedis, header, logs, spawn_app_with};

/// A miss stored in Redis, then a hit from it (not from the memory tier).
async fn assert_served_from_redis(app: &TestApp) {
    let miss = app.metrics("1").await;
    assert_eq!(header(&miss, "cache-status"), "runcache; fwd=miss; stored");
    let hit = app.metrics("1").await;
    assert_eq!(header(&hit, "x-cache"), "HIT");
    assert!(!header(&hit, "cache-status").contains("memory-fallback"));
}

#[tokio::test]
async fn an_acl_user_limited_to_the_prefix_is_enough() {
    let redis = TestRedis::start().await;
    let prefix = format!("acl{}", uuid::Uuid::new_v4().simple());
    let pattern = format!("~{prefix}:*");
    let _: () = redis
        .cmd(&[
            "ACL",
            "SETUSER",
            "runcache",
            "on",
            ">acl-s3cret-pw",
            &pattern,
            "&*",
            "+@all",
            "-flushall",
            "-flushdb",
            "-keys",
        ])
        .await
        .expect("acl user");
    // The default user may no longer do anything: runcache must work as `runcache` alone.
    let _: () = redis
        .cmd(&["ACL", "SETUSER", "default", "nopass", "-@all"])
        .await
        .expect("default user");
    let url = redis
        .url()
        .replace("redis://", "redis://runcache:acl-s3cret-pw@");
    let app = spawn_app_with(None, |s| {
        s.redis.url = secrecy::SecretString::from(url.clone());
        s.cache.prefix = prefix.clone();
        s.auth.frontend = "none".into();
    })
    .await;
    assert_served_from_redis(&app).await;
    let event = app
        .event("training-completed", serde_json::json!("1"))
        .await;
    assert_eq!(event.status(), 200);
    assert_eq!(header(&app.metrics("1").await, "x-cache"), "MISS");
    assert_eq!(app.stats().await["backend"], "redis");
    assert!(
        !logs().contains("acl-s3cret-pw"),
        "the password reached a log line"
    );
}

/// A `redis-server` that speaks only TLS, with a certificate authority made for it now.
struct TlsRedis {
    child: std::process::Child,
    dir: std::path::PathBuf,
    port: u16,
}

impl TlsRedis {
    async fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("runcache-tls-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        let openssl = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .current_dir(&dir)
                .args(args)
                .output()
                .expect("openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=runcache test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ]);
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ]);
        std::fs::write(
            dir.join("san.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .expect("san");
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "san.ext",
            "-out",
            "server.pem",
        ]);
        let port = crate::helpers::free_port();
        let child = std::process::Command::new("redis-server")
            .current_dir(&dir)
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--tls-cert-file",
                "server.pem",
                "--tls-key-file",
                "server.key",
                "--tls-ca-cert-file",
                "ca.pem",
                "--tls-auth-clients",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
                "--bind",
                "127.0.0.1",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server with TLS");
        crate::helpers::wait_for(|| async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
        Self { child, dir, port }
    }

    fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }

    fn ca(&self) -> String {
        self.dir.join("ca.pem").display().to_string()
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn rediss_with_a_ca_bundle_serves_from_redis() {
    let redis = TlsRedis::start().await;
    let (url, ca) = (redis.url(), redis.ca());
    let app = spawn_app_with(None, |s| {
        s.redis.url = secrecy::SecretString::from(url.clone());
        s.redis.tls_ca_file = Some(ca.clone());
        s.auth.frontend = "none".into();
    })
    .await;
    assert_served_from_redis(&app).await;
    assert_eq!(app.stats().await["backend"], "redis");
}

/// Without the CA bundle the server's certificate is not trusted: nothing is sent to it,
/// and the instance serves from memory.
#[tokio::test]
async fn rediss_without_the_servers_ca_is_not_trusted() {
    let redis = TlsRedis::start().await;
    let url = redis.url();
    let app = spawn_app_with(None, |s| {
        s.redis.url = secrecy::SecretString::from(url.clone());
        s.auth.frontend = "none".into();
    })
    .await;
    let resp = app.metrics("1").await;
    assert_eq!(resp.status(), 200);
    assert!(header(&resp, "cache-status").contains("memory-fallback"));
    assert_eq!(app.stats().await["backend"], "memory");
}
