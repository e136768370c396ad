//! The web console: one page (`index.html`, `console.js`) over the same
//! JSON API. Logging in checks the credential and keeps it in an HttpOnly,
//! SameSite=Strict cookie, which the API accepts like a bearer credential.

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;

use crate::api::{AppState, Body};
use crate::error::Result;

const INDEX: &str = include_str!("index.html");
const SCRIPT: &str = include_str!("console.js");

/// The console's routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { Html(INDEX) }))
        .route(
            "/console.js",
            get(|| async { ([(header::CONTENT_TYPE, "text/javascript")], SCRIPT) }),
        )
        .route("/login", post(login))
        .route("/logout", post(logout))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    credential: String,
}

async fn login(State(st): State<AppState>, body: Body) -> Result<Response> {
    let b: Login = body.json()?;
    let who = st.region.authenticate(b.credential.trim()).await?;
    let cookie = format!(
        "sc_credential={}; HttpOnly; SameSite=Strict; Path=/",
        b.credential.trim()
    );
    let mut r = (StatusCode::OK, axum::Json(who)).into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(r)
}

async fn logout() -> Response {
    let mut r = StatusCode::NO_CONTENT.into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("sc_credential=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
    );
    r
}
