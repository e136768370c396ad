//! What the tests against a Soft-RoCE guest share on the host side: an
//! engine and an out-of-band listener in the test's namespace, and a
//! connection to the guest's tool once it listens.

use std::time::{Duration, Instant};

use softcard_testkit::rxe::{GUEST, HOST};
use softcard_testkit::Netns;

/// Runs `f` on a thread in the namespace, with an engine on the host's
/// address and a listener on the out-of-band port (18515), both ready
/// before this returns.
pub fn on_host<T: Send + 'static>(
    ns: &std::sync::Arc<Netns>,
    f: impl FnOnce(softcard_rdma::rc::Engine, std::net::TcpListener) -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let ns = ns.clone();
    let host = std::thread::spawn(move || {
        ns.enter();
        let eng = softcard_rdma::rc::Engine::open(HOST).expect("engine (needs CAP_NET_RAW)");
        let tcp = std::net::TcpListener::bind((HOST, 18515)).unwrap();
        softcard_testkit::deadline::limit_accept(&tcp, Duration::from_secs(180));
        ready_tx.send(()).unwrap();
        f(eng, tcp)
    });
    ready_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("host side ready");
    host
}

/// Connects to the guest's out-of-band port once its tool listens there.
pub fn connect_when_listening() -> std::net::TcpStream {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match std::net::TcpStream::connect((GUEST, 18515)) {
            Ok(c) => return c,
            Err(_) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("the guest's server never listened: {e}"),
        }
    }
}
