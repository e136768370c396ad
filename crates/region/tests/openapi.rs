//! The OpenAPI file (docs/api/region.yaml) and the routes in the code stay
//! in step: every route the router declares is documented with its
//! methods, and the file documents no route the router lacks.

use std::collections::BTreeSet;

/// (method, path) of each `.route("PATH", get(..).post(..))` in `src`,
/// with `prefix` before the paths of the lines from `from` to `to`.
fn routes_in(src: &str, prefix: &str, from: &str, to: &str) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    let mut inside = false;
    let mut pending = String::new();
    for line in src.lines() {
        if line.contains(from) {
            inside = true;
        }
        if line.contains(to) {
            inside = false;
        }
        let l = line.trim();
        if l.starts_with(".route(") || !pending.is_empty() {
            pending.push_str(l);
            // A route call may span lines: gather until its parentheses close.
            let open = pending.matches('(').count();
            let close = pending.matches(')').count();
            if open > close {
                continue;
            }
            let path = pending.split('"').nth(1).unwrap().to_owned();
            let path = if inside {
                format!("{prefix}{path}")
            } else {
                path
            };
            for m in ["get", "post", "put", "delete"] {
                if pending.contains(&format!("{m}(")) {
                    out.insert((m.to_owned(), path.clone()));
                }
            }
            pending.clear();
        }
    }
    out
}

fn documented() -> BTreeSet<(String, String)> {
    let yaml = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/api/region.yaml"
    ))
    .unwrap();
    let mut out = BTreeSet::new();
    let mut path = None;
    let mut in_paths = false;
    for line in yaml.lines() {
        if line == "paths:" {
            in_paths = true;
            continue;
        }
        if !in_paths {
            continue;
        }
        if let Some(p) = line.strip_prefix("  /") {
            path = Some(format!("/{}", p.trim_end_matches(':')));
        } else if let Some(m) = line.strip_prefix("    ").and_then(|l| l.strip_suffix(':')) {
            if ["get", "post", "put", "delete"].contains(&m) {
                out.insert((m.to_owned(), path.clone().unwrap()));
            }
        }
    }
    out
}

#[test]
fn openapi_file_matches_the_routes() {
    let api = include_str!("../src/api.rs");
    let console = include_str!("../src/console/mod.rs");
    let mut code = routes_in(api, "/v1", "let v1 = Router::new()", ".fallback(");
    code.extend(routes_in(console, "", "\u{0}", "\u{0}"));
    let doc = documented();
    assert!(code.len() > 25, "found only {code:?}");
    let undocumented: Vec<_> = code.difference(&doc).collect();
    let phantom: Vec<_> = doc.difference(&code).collect();
    assert!(
        undocumented.is_empty(),
        "routes missing from region.yaml: {undocumented:?}"
    );
    assert!(
        phantom.is_empty(),
        "region.yaml documents routes the code lacks: {phantom:?}"
    );
}
