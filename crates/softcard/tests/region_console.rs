//! The region's web console in headless Chromium: a tenant logs in with a
//! credential, launches an instance by clicking, sees it reach running,
//! creates a volume and attaches it (the guest sees the disk), and
//! terminates the instance. A wrong credential is refused, and without a
//! login the page's API calls are refused.

mod common;

use std::time::Duration;

use common::net::{wait_until, Net};
use softcard_testkit::browser::Browser;

const SLOW: Duration = Duration::from_secs(90);

fn row_state(kind: &str, name: &str) -> String {
    format!(
        "(() => {{ const r = document.querySelector('#{kind} tr[data-name=\"{name}\"]'); \
         return r ? r.dataset.state : null; }})()"
    )
}

#[test]
fn console_launches_attaches_and_terminates() {
    let net = Net::start(false);
    let mut b = Browser::open(&format!("{}/", net.url()), 1280, 900);
    b.wait_for(
        "the login form",
        "!!document.getElementById('credential')",
        SLOW,
    );
    // The API refuses the page before it logs in.
    let status = b.eval("fetch('/v1/instances').then(r => r.status)");
    assert_eq!(status, 401);

    // A wrong credential is refused and the tables stay hidden.
    b.eval("window.alert = (m) => { window.lastAlert = m; }; true");
    b.type_into("#credential", &format!("sc_{}", "0".repeat(64)));
    b.click("#login-button");
    b.wait_for("the refusal", "!!window.lastAlert", SLOW);
    assert_eq!(
        b.eval("document.getElementById('main').classList.contains('hidden')"),
        true
    );

    let cred = std::fs::read_to_string(&net.tenant).unwrap();
    b.type_into("#credential", cred.trim());
    b.click("#login-button");
    b.wait_for(
        "the tables",
        "!document.getElementById('main').classList.contains('hidden')",
        SLOW,
    );
    assert_eq!(
        b.eval("document.getElementById('who').textContent"),
        "tenant acme"
    );

    // Launch an instance by clicking.
    b.type_into("#ci-name", "clicked");
    b.type_into("#ci-size", "128MiB");
    b.click("#ci-create");
    b.wait_for(
        "the instance row running",
        &format!("{} === 'running'", row_state("instances", "clicked")),
        SLOW,
    );
    assert_eq!(net.state("clicked"), "running");

    // Create a volume next to it and attach it.
    b.type_into("#cv-name", "vol1");
    b.type_into("#cv-size", "16MiB");
    b.type_into("#cv-near", "clicked");
    b.click("#cv-create");
    b.wait_for(
        "the volume available",
        &format!("{} === 'available'", row_state("volumes", "vol1")),
        SLOW,
    );
    b.click("#volumes tr[data-name=\"vol1\"] button[data-action=\"attach\"]");
    b.wait_for(
        "the volume in use",
        &format!("{} === 'in-use'", row_state("volumes", "vol1")),
        SLOW,
    );
    wait_until("the guest sees the disk", SLOW, || {
        net.console("clicked").contains("disk vdb appeared")
    });
    // The console output button shows the guest's serial console.
    b.click("#instances tr[data-name=\"clicked\"] button[data-action=\"console\"]");
    b.wait_for(
        "the console output",
        "document.getElementById('console-output').textContent.includes('softcard: instance')",
        SLOW,
    );
    let shot = b.screenshot();
    // SOFTCARD_TEST_SCREENSHOT=FILE keeps the picture, to look at.
    if let Ok(path) = std::env::var("SOFTCARD_TEST_SCREENSHOT") {
        std::fs::write(path, &shot).unwrap();
    }
    assert!(shot.starts_with(b"\x89PNG"));

    // Terminate by clicking.
    let id = net.instance("clicked")["id"].as_str().unwrap().to_owned();
    b.click("#instances tr[data-name=\"clicked\"] button[data-action=\"terminate\"]");
    b.wait_for(
        "the instance terminated",
        &format!("{} === 'terminated'", row_state("instances", "clicked")),
        SLOW,
    );
    assert_eq!(net.state(&id), "terminated");
    assert_eq!(net.volume("vol1")["state"], "available");
}
