//! Admin endpoints on a loopback port: off without a token, 401/403 without
//! the right one, files confined to the models folder (`..`, absolute paths
//! and symlinks out refused), load → served → unload → gone.

mod server_support;

use meswitch_server::server::admin::AdminConfig;
use server_support::*;

fn chat_body(model: &str, content: &str, extra: &str) -> String {
    let msg = serde_json::json!([{"role": "user", "content": content}]);
    format!(r#"{{"model":"{model}","messages":{msg}{extra}}}"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_load_and_unload_need_the_token_and_stay_in_the_models_folder() {
    // Admin off: 404 whatever the token.
    let s = start(Setup::default()).await;
    let r = post_auth(
        s.addr,
        "/admin/experts/unload",
        "x",
        r#"{"name":"expert-00"}"#,
    )
    .await;
    assert_eq!(r.status, 404);
    r.error();
    s.shutdown().await;

    let fam = family();
    let extra = &fam.experts[3];
    let (tmp, models) = models_dir_with(&[extra]);
    let outside = tmp.path().join("outside.safetensors");
    std::fs::copy(&extra.path, &outside).unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(&outside, models.join("link.safetensors")).unwrap();
    let token = "s3cret-token";
    let setup = Setup {
        experts: fam.experts[..3].to_vec(),
        admin: Some(AdminConfig::new(token, &models).unwrap()),
        ..Setup::default()
    };
    let s = start(setup).await;
    let file = extra.path.file_name().unwrap().to_str().unwrap();
    let load = format!(r#"{{"name":"late","file":"{file}"}}"#);
    let raw_no_auth = raw(
        s.addr,
        &request("POST", "/admin/experts/load", &[], load.as_bytes()),
    )
    .await;
    assert_eq!(raw_no_auth.status, 401);
    assert_eq!(
        post_auth(s.addr, "/admin/experts/load", "wrong", &load)
            .await
            .status,
        403
    );
    for bad in [
        format!("../{file}"),
        outside.display().to_string(),
        "link.safetensors".to_string(),
        "/etc/passwd".to_string(),
    ] {
        let body = serde_json::json!({"name": "late", "file": bad}).to_string();
        let r = post_auth(s.addr, "/admin/experts/load", token, &body).await;
        assert_eq!(r.status, 403, "{bad}: {}", r.text());
    }
    let r = post_auth(
        s.addr,
        "/admin/experts/load",
        token,
        r#"{"name":"late","file":"missing.safetensors"}"#,
    )
    .await;
    assert_eq!((r.status, r.error()["param"].as_str()), (400, Some("file")));
    let r = post_auth(
        s.addr,
        "/admin/experts/load",
        token,
        r#"{"name":"auto","file":"x"}"#,
    )
    .await;
    assert_eq!((r.status, r.error()["param"].as_str()), (400, Some("name")));

    // Not served before the load, served after, gone after the unload.
    let gen = chat_body("late", "hi", r#","max_tokens":2"#);
    assert_eq!(post(s.addr, "/v1/chat/completions", &gen).await.status, 404);
    let r = post_auth(s.addr, "/admin/experts/load", token, &load).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        post_auth(s.addr, "/admin/experts/load", token, &load)
            .await
            .status,
        409,
        "already loaded"
    );
    let r = post(s.addr, "/v1/chat/completions", &gen).await;
    assert_eq!(
        (r.status, r.header("x-meswitch-expert")),
        (200, Some("late")),
        "{}",
        r.text()
    );
    assert!(get(s.addr, "/v1/models").await.text().contains("\"late\""));
    let list = raw(
        s.addr,
        &request(
            "GET",
            "/admin/experts",
            &[("Authorization", &format!("Bearer {token}"))],
            b"",
        ),
    )
    .await;
    assert!(list.json()["experts"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["name"] == "late"));
    let unload = r#"{"name":"late"}"#;
    assert_eq!(
        post_auth(s.addr, "/admin/experts/unload", "wrong", unload)
            .await
            .status,
        403
    );
    let r = post_auth(s.addr, "/admin/experts/unload", token, unload).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(post(s.addr, "/v1/chat/completions", &gen).await.status, 404);
    assert_eq!(
        post_auth(s.addr, "/admin/experts/unload", token, unload)
            .await
            .status,
        404
    );
    s.shutdown().await;
}
