//! What the hub serves to pages: the browser library under every name a Web
//! Connection page may use, with CORS headers so a page on another origin
//! can import it as a module, and the chat sample, which can be turned off.

use crate::common::{TestServer, test_config};

const LIBRARY_NAMES: [&str; 3] = [
    "/scripts/webconnection-websocket.js",
    "/scripts/web-connection-websocket.js",
    // The name in Web Connection's own blog posts and changelog.
    "/scripts/westwind-websocket.js",
];

async fn get_from(server: &TestServer, path: &str, origin: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(server.url(path))
        .header("origin", origin)
        .send()
        .await
        .expect("GET")
}

#[tokio::test]
async fn the_library_is_served_under_all_three_names() {
    let server = TestServer::start().await;
    let mut bodies = Vec::new();
    for path in LIBRARY_NAMES {
        let resp = server.get(path).await;
        assert_eq!(resp.status(), 200, "{path}");
        assert_eq!(
            resp.headers()["content-type"],
            "text/javascript; charset=utf-8",
            "{path}"
        );
        bodies.push(resp.text().await.unwrap());
    }
    assert!(bodies[0].contains("export class WebConnectionWebSocket"));
    assert!(bodies.iter().all(|b| *b == bodies[0]));
}

/// Module scripts from another origin need CORS. With no
/// `auth.allowed_origins` (any origin may open a socket) any origin may load
/// the files too; with a list, exactly the listed origins.
#[tokio::test]
async fn scripts_carry_cors_headers_for_the_allowed_origins() {
    let server = TestServer::start().await;
    for path in LIBRARY_NAMES
        .iter()
        .chain(&["/scripts/webconnection-websocket.d.ts"])
    {
        let resp = get_from(&server, path, "https://app.example.com").await;
        assert_eq!(resp.headers()["access-control-allow-origin"], "*", "{path}");
    }

    let mut config = test_config();
    config.auth.allowed_origins = vec!["https://app.example.com".into()];
    let server = TestServer::with(config).await;
    let path = LIBRARY_NAMES[0];
    let resp = get_from(&server, path, "https://app.example.com").await;
    assert_eq!(
        resp.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert_eq!(resp.headers()["vary"], "Origin");
    let resp = get_from(&server, path, "https://evil.example.net").await;
    assert_eq!(resp.status(), 200, "the file itself is public");
    assert!(!resp.headers().contains_key("access-control-allow-origin"));
    assert_eq!(resp.headers()["vary"], "Origin");
    // Only the scripts: nothing else is meant to be read cross-origin.
    let resp = get_from(&server, "/metrics", "https://app.example.com").await;
    assert!(!resp.headers().contains_key("access-control-allow-origin"));
}

#[tokio::test]
async fn the_sample_page_is_on_by_default_and_can_be_turned_off() {
    let server = TestServer::start().await;
    let resp = server.get("/").await;
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await.unwrap().contains("<title>"));

    let mut config = test_config();
    config.http.sample_page = false;
    let off = TestServer::with(config).await;
    assert_eq!(off.get("/").await.status(), 404);
    // The library stays: pages of the application still load it.
    assert_eq!(off.get(LIBRARY_NAMES[0]).await.status(), 200);
}

#[test]
fn sample_page_is_a_key_with_an_environment_variable() {
    let config = wshub::Config::load_from(
        None,
        [("WSHUB_HTTP__SAMPLE_PAGE".to_owned(), "false".to_owned())],
    )
    .unwrap();
    assert!(!config.http.sample_page);
    assert!(wshub::Config::default().http.sample_page);
}
