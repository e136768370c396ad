//! The region's JSON API over HTTP (axum), described in
//! `docs/api/region.yaml`. Every call under `/v1/` carries a credential
//! (`Authorization: Bearer sc_...`, or the console's cookie); tenants see
//! only their own instances and volumes, admin-only calls refuse tenants,
//! and a host's card daemon reaches only the agent calls for itself.

use std::sync::Arc;

use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{RegionError, Result};
use crate::leader::Election;
use crate::model::{
    GpuServerRegistration, HostRegistration, InstanceState, Principal, IMAGES, INSTANCE_TYPES,
    VGPU_TYPES,
};
use crate::service::instances::CreateInstance;
use crate::service::volumes::{CreateVolume, VolumeReport};
use crate::service::Region;

/// Largest request body.
const MAX_BODY_BYTES: usize = 256 << 10;

/// What every handler gets.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The region.
    pub region: Arc<Region>,
    /// The election, for `/v1/region`.
    pub election: Arc<Election>,
}

/// A request body, read but not yet parsed: a handler checks who may make
/// the call first, then parses (so a refused caller learns nothing about
/// the body's form).
#[derive(Debug)]
pub struct Body(pub axum::body::Bytes);

impl Body {
    /// The body as JSON, or the API's 400 with a message.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.0)
            .map_err(|e| RegionError::Invalid(format!("request body: {e}")))
    }
}

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = RegionError;

    async fn from_request(req: Request, state: &S) -> Result<Self> {
        axum::body::Bytes::from_request(req, state)
            .await
            .map(Body)
            .map_err(|e| RegionError::Invalid(format!("request body: {e}")))
    }
}

/// The router.
pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/whoami", get(whoami))
        .route("/region", get(region_info))
        .route(
            "/instance-types",
            get(|| async { Json(json!(INSTANCE_TYPES)) }),
        )
        .route("/images", get(|| async { Json(json!(IMAGES)) }))
        .route("/tenants", get(tenants).post(create_tenant))
        .route("/tenants/{name}/credentials", post(tenant_credential))
        .route("/hosts", get(hosts))
        .route("/hosts/{name}/credentials", post(host_credential))
        .route("/gpu-servers", get(gpu_servers))
        .route("/gpu-servers/{name}/credentials", post(gpu_credential))
        .route("/instances", get(instances).post(create_instance))
        .route("/instances/{id}", get(instance))
        .route("/instances/{id}/console", get(console))
        .route(
            "/instances/{id}/vgpu",
            post(attach_vgpu).delete(detach_vgpu),
        )
        .route("/vgpus", get(vgpus))
        .route("/vgpus/{id}/frame", get(vgpu_frame))
        .route("/vgpu-types", get(|| async { Json(json!(VGPU_TYPES)) }))
        .route("/instances/{id}/{action}", post(instance_action))
        .route("/volumes", get(volumes).post(create_volume))
        .route("/volumes/{id}", get(volume).delete(delete_volume))
        .route("/volumes/{id}/attach", post(attach_volume))
        .route("/volumes/{id}/detach", post(detach_volume))
        .route("/agent/register", put(agent_register))
        .route("/agent/heartbeat", post(agent_heartbeat))
        .route("/agent/work", get(agent_work))
        .route("/agent/instances/{id}/status", post(agent_instance_status))
        .route("/agent/instances/{id}/console", put(agent_console))
        .route("/agent/volumes/{id}/status", post(agent_volume_status))
        .route("/agent/gpu/register", put(gpu_register))
        .route("/agent/gpu/heartbeat", post(gpu_heartbeat))
        .route("/agent/gpu/work", get(gpu_work))
        .route("/agent/gpu/certificate", post(gpu_certificate))
        .route("/agent/gpu/attached", post(gpu_attached))
        .route("/agent/gpu/released", post(gpu_released))
        .fallback(|| async { RegionError::NotFound("no such API call".into()) })
        .layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .nest("/v1", v1)
        .route("/healthz", get(|| async { "ok" }))
        .merge(crate::console::routes())
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// The credential in `Authorization: Bearer ...` or the console's cookie.
fn credential(req: &Request) -> Option<String> {
    if let Some(v) = req.headers().get(header::AUTHORIZATION) {
        return v
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|s| s.trim().to_owned());
    }
    req.headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix("sc_credential="))
        .map(str::to_owned)
}

async fn authenticate(
    State(st): State<AppState>,
    mut req: Request,
    next: Next,
) -> Result<Response> {
    let secret = credential(&req).ok_or(RegionError::Unauthenticated)?;
    let who = st.region.authenticate(&secret).await?;
    req.extensions_mut().insert(who);
    Ok(next.run(req).await)
}

fn admin(p: &Principal) -> Result<()> {
    match p {
        Principal::Admin => Ok(()),
        _ => Err(RegionError::Forbidden("this call is for the admin".into())),
    }
}

/// The tenant a tenant-facing call acts for: `Some(t)` for a tenant, `None`
/// (everything) for the admin; hosts are refused.
fn scope(p: &Principal) -> Result<Option<&str>> {
    match p {
        Principal::Admin => Ok(None),
        Principal::Tenant(t) => Ok(Some(t)),
        Principal::Host(_) | Principal::GpuServer(_) => Err(RegionError::Forbidden(
            "a host's or GPU server's credential reaches only the agent calls".into(),
        )),
    }
}

fn tenant(p: &Principal) -> Result<&str> {
    match p {
        Principal::Tenant(t) => Ok(t),
        _ => Err(RegionError::Forbidden(
            "instances and volumes are created with a tenant's credential".into(),
        )),
    }
}

fn host(p: &Principal) -> Result<&str> {
    match p {
        Principal::Host(h) => Ok(h),
        _ => Err(RegionError::Forbidden(
            "this call is for hosts' card daemons".into(),
        )),
    }
}

type P = Extension<Principal>;
type S = State<AppState>;

async fn whoami(Extension(p): P) -> Json<Principal> {
    Json(p)
}

async fn region_info(State(st): S, Extension(p): P) -> Result<Json<Value>> {
    admin(&p)?;
    let leader = st
        .region
        .store()
        .get(&crate::model::keys::leader())
        .await?
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned());
    Ok(Json(json!({
        "me": st.election.me,
        "leading": st.election.leading(),
        "leader": leader,
        "placement_conflicts": st.region.placement.conflicts.load(std::sync::atomic::Ordering::Relaxed),
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Named {
    name: String,
}

async fn tenants(State(st): S, Extension(p): P) -> Result<Json<Value>> {
    admin(&p)?;
    Ok(Json(json!(st.region.tenants().await?)))
}

async fn create_tenant(State(st): S, Extension(p): P, body: Body) -> Result<Response> {
    admin(&p)?;
    let b: Named = body.json()?;
    let t = st.region.create_tenant(&b.name).await?;
    Ok((StatusCode::CREATED, Json(json!(t))).into_response())
}

/// (admin) A new credential for `who`; the secret is in the answer once.
async fn issue(st: &AppState, p: &Principal, who: Principal) -> Result<Response> {
    admin(p)?;
    let secret = st.region.create_credential(who.clone()).await?;
    let (kind, name) = match who {
        Principal::Tenant(n) => ("tenant", n),
        Principal::Host(n) => ("host", n),
        Principal::GpuServer(n) => ("gpu_server", n),
        Principal::Admin => ("admin", String::new()),
    };
    Ok((
        StatusCode::CREATED,
        Json(json!({kind: name, "credential": secret})),
    )
        .into_response())
}

async fn tenant_credential(
    State(st): S,
    Extension(p): P,
    Path(name): Path<String>,
) -> Result<Response> {
    issue(&st, &p, Principal::Tenant(name)).await
}

async fn host_credential(
    State(st): S,
    Extension(p): P,
    Path(name): Path<String>,
) -> Result<Response> {
    issue(&st, &p, Principal::Host(name)).await
}

async fn gpu_credential(
    State(st): S,
    Extension(p): P,
    Path(name): Path<String>,
) -> Result<Response> {
    issue(&st, &p, Principal::GpuServer(name)).await
}

async fn gpu_servers(State(st): S, Extension(p): P) -> Result<Json<Value>> {
    admin(&p)?;
    Ok(Json(json!(st.region.gpu_servers().await?)))
}

fn gpu_server(p: &Principal) -> Result<&str> {
    match p {
        Principal::GpuServer(g) => Ok(g),
        _ => Err(RegionError::Forbidden(
            "this call is for GPU servers".into(),
        )),
    }
}

async fn gpu_register(State(st): S, Extension(p): P, body: Body) -> Result<Json<Value>> {
    let g = gpu_server(&p)?;
    let b: GpuServerRegistration = body.json()?;
    let ttl = st.region.register_gpu_server(g, b).await?;
    Ok(Json(
        json!({"gpu_server": g, "lease_seconds": ttl.as_secs()}),
    ))
}

async fn gpu_certificate(State(st): S, Extension(p): P, body: Body) -> Result<Json<Value>> {
    let g = gpu_server(&p)?;
    #[derive(serde::Deserialize)]
    struct Csr {
        csr: String,
    }
    let b: Csr = body.json()?;
    Ok(Json(st.region.sign_gpu_server(g, &b.csr)?))
}

/// A GPU server's report on some of its attachments.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Attachments {
    attachments: Vec<String>,
}

async fn gpu_attached(State(st): S, Extension(p): P, body: Body) -> Result<Json<Value>> {
    let g = gpu_server(&p)?;
    let b: Attachments = body.json()?;
    let n = st.region.gpu_attached(g, &b.attachments).await?;
    Ok(Json(json!({"attached": n})))
}

async fn gpu_released(State(st): S, Extension(p): P, body: Body) -> Result<Json<Value>> {
    let g = gpu_server(&p)?;
    let b: Attachments = body.json()?;
    let n = st.region.gpu_released(g, &b.attachments).await?;
    Ok(Json(json!({"released": n})))
}

async fn gpu_work(State(st): S, Extension(p): P) -> Result<Json<Value>> {
    Ok(Json(st.region.gpu_work(gpu_server(&p)?).await?))
}

async fn gpu_heartbeat(State(st): S, Extension(p): P) -> Result<Json<Value>> {
    st.region.gpu_heartbeat(gpu_server(&p)?).await?;
    Ok(Json(json!({})))
}

async fn hosts(State(st): S, Extension(p): P) -> Result<Json<Value>> {
    admin(&p)?;
    Ok(Json(json!(st.region.hosts().await?)))
}

async fn instances(State(st): S, Extension(p): P) -> Result<Json<Value>> {
    Ok(Json(json!(st.region.instances(scope(&p)?).await?)))
}

async fn create_instance(State(st): S, Extension(p): P, body: Body) -> Result<Response> {
    let t = tenant(&p)?;
    let b: CreateInstance = body.json()?;
    let (_, v) = st.region.create_instance(t, &b).await?;
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

async fn instance(State(st): S, Extension(p): P, Path(id): Path<String>) -> Result<Json<Value>> {
    Ok(Json(st.region.instance_view(scope(&p)?, &id).await?))
}

async fn console(State(st): S, Extension(p): P, Path(id): Path<String>) -> Result<Json<Value>> {
    let out = st.region.console_output(scope(&p)?, &id).await?;
    Ok(Json(json!({"instance": id, "output": out})))
}

async fn instance_action(
    State(st): S,
    Extension(p): P,
    Path((id, action)): Path<(String, String)>,
) -> Result<Json<Value>> {
    let t = scope(&p)?;
    let r = &st.region;
    let i = match action.as_str() {
        "stop" => r.stop_instance(t, &id).await?,
        "start" => r.start_instance(t, &id).await?,
        "reboot" => r.reboot_instance(t, &id).await?,
        "terminate" => r.terminate_instance(t, &id).await?,
        _ => {
            return Err(RegionError::NotFound(format!(
                "no action {action:?} (stop, start, reboot, terminate)"
            )))
        }
    };
    Ok(Json(r.instance_view(t, &i.id).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AttachVgpu {
    #[serde(rename = "type")]
    vgpu_type: String,
}

async fn attach_vgpu(
    State(st): S,
    Extension(p): P,
    Path(id): Path<String>,
    body: Body,
) -> Result<Response> {
    let t = tenant(&p)?;
    let b: AttachVgpu = body.json()?;
    let v = st.region.attach_vgpu(t, &id, &b.vgpu_type).await?;
    Ok((StatusCode::CREATED, Json(json!(v))).into_response())
}

async fn detach_vgpu(State(st): S, Extension(p): P, Path(id): Path<String>) -> Result<Json<Value>> {
    Ok(Json(json!(st.region.detach_vgpu(scope(&p)?, &id).await?)))
}

async fn vgpus(State(st): S, Extension(p): P) -> Result<Json<Value>> {
    Ok(Json(json!(st.region.vgpus(scope(&p)?).await?)))
}

#[derive(serde::Deserialize)]
struct After {
    #[serde(default)]
    after: u64,
}

/// A vGPU's newest frame after `?after=SEQ` (JPEG; `X-Frame-Seq` numbers
/// it), or 204 when none came within a couple of seconds.
async fn vgpu_frame(
    State(st): S,
    Extension(p): P,
    Path(id): Path<String>,
    axum::extract::Query(q): axum::extract::Query<After>,
) -> Result<Response> {
    match st.region.vgpu_frame(scope(&p)?, &id, q.after).await? {
        None => Ok(StatusCode::NO_CONTENT.into_response()),
        Some(f) => Ok((
            [
                (header::CONTENT_TYPE, "image/jpeg".to_owned()),
                (header::CACHE_CONTROL, "no-store".to_owned()),
                (
                    header::HeaderName::from_static("x-frame-seq"),
                    f.seq.to_string(),
                ),
                (header::HeaderName::from_static("x-frame-size"), f.size),
            ],
            f.jpeg,
        )
            .into_response()),
    }
}

async fn volumes(State(st): S, Extension(p): P) -> Result<Json<Value>> {
    Ok(Json(json!(st.region.volumes(scope(&p)?).await?)))
}

async fn create_volume(State(st): S, Extension(p): P, body: Body) -> Result<Response> {
    let t = tenant(&p)?;
    let b: CreateVolume = body.json()?;
    let v = st.region.create_volume(t, &b).await?;
    Ok((StatusCode::CREATED, Json(json!(v))).into_response())
}

async fn volume(State(st): S, Extension(p): P, Path(id): Path<String>) -> Result<Json<Value>> {
    Ok(Json(json!(st.region.volume(scope(&p)?, &id).await?.value)))
}

async fn delete_volume(
    State(st): S,
    Extension(p): P,
    Path(id): Path<String>,
) -> Result<Json<Value>> {
    Ok(Json(json!(st.region.delete_volume(scope(&p)?, &id).await?)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AttachBody {
    instance: String,
}

async fn attach_volume(
    State(st): S,
    Extension(p): P,
    Path(id): Path<String>,
    body: Body,
) -> Result<Json<Value>> {
    let t = scope(&p)?;
    let b: AttachBody = body.json()?;
    Ok(Json(json!(
        st.region.attach_volume(t, &id, &b.instance).await?
    )))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DetachBody {
    #[serde(default)]
    force: bool,
}

async fn detach_volume(
    State(st): S,
    Extension(p): P,
    Path(id): Path<String>,
    body: Body,
) -> Result<Json<Value>> {
    let t = scope(&p)?;
    let b: DetachBody = body.json()?;
    Ok(Json(json!(st.region.detach_volume(t, &id, b.force).await?)))
}

async fn agent_register(State(st): S, Extension(p): P, body: Body) -> Result<Json<Value>> {
    let h = host(&p)?;
    let b: HostRegistration = body.json()?;
    let ttl = st.region.register_host(h, b).await?;
    Ok(Json(json!({"host": h, "lease_seconds": ttl.as_secs()})))
}

async fn agent_heartbeat(State(st): S, Extension(p): P) -> Result<Json<Value>> {
    st.region.heartbeat(host(&p)?).await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct WorkQuery {
    /// Answer when something changed after this revision (at most 2 s).
    wait: Option<i64>,
}

/// Longest a host's long poll waits.
const WORK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

async fn agent_work(
    State(st): S,
    Extension(p): P,
    axum::extract::Query(q): axum::extract::Query<WorkQuery>,
) -> Result<Json<Value>> {
    let h = host(&p)?;
    if let Some(rev) = q.wait {
        st.region.wait_for_change(h, rev, WORK_WAIT).await?;
    }
    Ok(Json(st.region.host_work(h).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InstanceReport {
    state: InstanceState,
    #[serde(default)]
    reason: Option<String>,
}

async fn agent_instance_status(
    State(st): S,
    Extension(p): P,
    Path(id): Path<String>,
    body: Body,
) -> Result<Json<Value>> {
    let h = host(&p)?;
    let b: InstanceReport = body.json()?;
    st.region.report_instance(h, &id, b.state, b.reason).await?;
    Ok(Json(json!({})))
}

async fn agent_console(
    State(st): S,
    Extension(p): P,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>> {
    st.region.put_console(host(&p)?, &id, &body).await?;
    Ok(Json(json!({})))
}

async fn agent_volume_status(
    State(st): S,
    Extension(p): P,
    Path(id): Path<String>,
    body: Body,
) -> Result<Json<Value>> {
    let h = host(&p)?;
    let b: VolumeReport = body.json()?;
    st.region.report_volume(h, &id, &b).await?;
    Ok(Json(json!({})))
}
