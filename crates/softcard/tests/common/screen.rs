//! What a browser shows of a vGPU: a screenshot's region compared with the
//! demo scene rendered locally on lavapipe.

use softcard_gpu::workloads::{self, Scene};

/// Mean absolute difference per colour channel between the `w`x`h`
/// region of `png` at (`x0`, `y0`) and the demo scene at t=0 rendered
/// locally. JPEG at quality 80 on this scene differs by a few levels; a
/// blank, stale or shifted picture by tens.
pub fn diff_from_scene(png: &[u8], x0: u32, y0: u32, w: u32, h: u32) -> f64 {
    let decoder = png::Decoder::new(std::io::Cursor::new(png));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let bpp = match info.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => panic!("screenshot in {other:?}"),
    };
    assert!(
        x0 + w <= info.width && y0 + h <= info.height,
        "the picture ({w}x{h} at {x0},{y0}) is not inside the {}x{} screenshot",
        info.width,
        info.height
    );
    let (device, queue) = workloads::open(&workloads::local_instance()).unwrap();
    let expect = Scene::new(&device, &queue, w, h)
        .render_pixels(&device, &queue, 0)
        .unwrap();
    let (x0, y0, w) = (x0 as usize, y0 as usize, w as usize);
    let mut diff: u64 = 0;
    let mut n: u64 = 0;
    for y in 0..h as usize {
        for x in 0..w {
            let s = &buf[(y0 + y) * info.line_size + (x0 + x) * bpp..][..3];
            let e = &expect[(y * w + x) * 4..][..3];
            for k in 0..3 {
                diff += u64::from(s[k].abs_diff(e[k]));
                n += 1;
            }
        }
    }
    diff as f64 / n as f64
}
