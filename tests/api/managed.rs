//! Managed Redis: an ACL user limited to runcache's own keys, and (below) TLS.

use crate::helpers::{TestRedis, header, logs, spawn_app_with};

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
    let miss = app.metrics("1").await;
    assert_eq!(header(&miss, "cache-status"), "runcache; fwd=miss; stored");
    let hit = app.metrics("1").await;
    assert_eq!(header(&hit, "x-cache"), "HIT");
    assert!(!header(&hit, "cache-status").contains("memory-fallback"));
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
