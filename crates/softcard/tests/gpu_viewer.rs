//! The vGPU's output reaches a real browser: `softcard gpu serve` with a
//! viewer, `softcard gpu demo` rendering to a remote surface, and headless
//! Chromium (driven over the DevTools protocol) showing the frames. The
//! screenshot must show the frame a local lavapipe rendering of the same
//! scene produces, and the page must count frames arriving.

#[path = "common/screen.rs"]
mod screen;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use softcard_testkit::browser::Browser;

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "port {port} never opened");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Status and body of a GET on the viewer.
fn http_get_status(port: u16, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // One write, so that the server sees the whole request at once.
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn chromium_shows_the_remote_frames() {
    let bin = env!("CARGO_BIN_EXE_softcard");
    let (gport, vport) = (free_port(), free_port());
    let _server = Kill(
        Command::new(bin)
            .args(["gpu", "serve", "--listen", &format!("127.0.0.1:{gport}")])
            .args(["--viewer", &format!("127.0.0.1:{vport}")])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_port(gport);
    wait_port(vport);
    let (w, h) = (640u32, 360u32);
    let mut demo = Kill(
        Command::new(bin)
            .args(["gpu", "demo", "--server", &format!("127.0.0.1:{gport}")])
            .args([
                "--width",
                &w.to_string(),
                "--height",
                &h.to_string(),
                "--fps",
                "30",
                "--still",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // The demo prints its session's secret viewer path first.
    let mut out = BufReader::new(demo.0.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let viewer_path = line
        .trim()
        .strip_prefix("viewer: ")
        .unwrap_or_else(|| panic!("demo printed {line:?}"))
        .to_string();
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));

    // Without the session's token there is nothing to see.
    for path in [
        "/",
        "/frame.jpg",
        "/frame.jpg?s=00112233445566778899aabbccddeeff",
    ] {
        let (status, _) = http_get_status(vport, path);
        assert_eq!(status, 404, "{path} answered {status}");
    }
    let (status, body) = http_get_status(vport, &viewer_path);
    assert_eq!(status, 200);
    assert!(body.contains("softcard vGPU"));

    let mut cdp = Browser::open(&format!("http://127.0.0.1:{vport}{viewer_path}"), 800, 500);
    // A viewport that holds the whole canvas, at one device pixel per pixel.
    cdp.call(
        "Emulation.setDeviceMetricsOverride",
        json!({ "width": 800, "height": 600, "deviceScaleFactor": 1, "mobile": false }),
    );

    // Frames arrive and the page measures their rate.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (frames, fps) = loop {
        let v = cdp.eval(
            "JSON.stringify({frames: Number(document.getElementById('frames').textContent), \
             fps: Number(document.getElementById('fps').textContent)})",
        );
        let v: Value = serde_json::from_str(v.as_str().unwrap_or("{}")).unwrap_or_default();
        let (frames, fps) = (
            v["frames"].as_u64().unwrap_or(0),
            v["fps"].as_f64().unwrap_or(0.0),
        );
        if frames >= 45 && fps > 0.0 {
            break (frames, fps);
        }
        assert!(
            Instant::now() < deadline,
            "viewer got {frames} frames, {fps} fps"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    println!("viewer: {frames} frames, {fps:.1} fps");

    // The screenshot shows the frame.
    let rect = cdp.eval(
        "(() => { const r = document.getElementById('screen').getBoundingClientRect(); \
         return [r.left, r.top, r.width, r.height]; })()",
    );
    let rect: Vec<u32> = rect
        .as_array()
        .unwrap()
        .iter()
        .map(|x| u32::try_from(x.as_f64().unwrap().round() as i64).unwrap())
        .collect();
    assert_eq!(&rect[2..], &[w, h], "canvas size");
    let png_bytes = cdp.screenshot();
    let mean = screen::diff_from_scene(&png_bytes, rect[0], rect[1], w, h);
    println!("screenshot vs local rendering: mean abs difference {mean:.2} per channel");
    // JPEG at quality 80 on this scene differs by a few levels on average;
    // a blank, stale or shifted picture differs by tens.
    assert!(
        mean < 6.0,
        "the screenshot does not show the rendered frame (mean diff {mean:.2})"
    );
}
