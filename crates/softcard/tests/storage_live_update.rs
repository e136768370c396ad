//! A running guest's disk across 20 upgrades and 20 crashes of the card.
//!
//! QEMU (TCG) runs four writers in the guest, each writing numbered 4 KiB
//! records with O_DIRECT and fsync (a flush) into its own blocks of
//! `/dev/vda`, and printing each record once its flush is answered. The
//! card serves the volume from a file through its volatile write cache
//! (unflushed writes die with the process; the cache completes each batch
//! out of order), so an acknowledged flush that was not durable, a request
//! the restarted card loses or runs twice out of place, shows on the
//! device. Meanwhile the card is upgraded (`softcard upgrade`) 20 times
//! and killed with SIGKILL 20 times, in a seeded random order, each at a
//! random moment once the card serving has answered requests (a guest
//! that stops sending fails the test at the next event, with what the
//! socket, QEMU and the card's rings show); QEMU reconnects
//! (`reconnect=1`) each time.
//!
//! Afterwards: the guest saw no I/O error, every block holds the newest
//! record acknowledged for it or a later one, the other volume on the
//! device is untouched and the partition map is intact.
//!
//! A second guest does the same, shorter, with the socket's roles
//! reversed: QEMU listens (`server=on`) and the card connects to it
//! (`--vhost-user-connect`), after each upgrade and each restart; its VM
//! is also paused and resumed (QMP `stop` / `cont`) four times, which
//! stops and restarts the ring on the same connection.
//!
//! A third has the card kill itself at the worst moment, four times: just
//! before an interrupt, its answers already on the used ring
//! (`SOFTCARD_TEST_DIE_BEFORE_SIGNAL`). The guest waits to hear of them;
//! the next card must interrupt it (docs/live-update.md, "A ring that
//! starts interrupts the driver once").
//!
//! Needs qemu-system-x86, linux-image-amd64 and busybox-static.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::guest::{build_initramfs, Guest};
use common::{file_bytes, pattern, Daemon};

const WRITERS: usize = 4;
/// Blocks each writer cycles through.
const BLOCKS: usize = 64;
const BLOCK: usize = 4096;
fn init_script(write_seconds: u32) -> String {
    format!(
        r#"
i=0
while [ ! -b /dev/vda ]; do
  i=$((i+1)); [ $i -gt 200 ] && {{ echo "SOFTCARD-FAIL no disk"; $B poweroff -f; }}
  $B sleep 0.1
done
writer() {{
  w=$1; k=0; end=$(( $($B date +%s) + {write_seconds} ))
  while [ $($B date +%s) -lt $end ]; do
    blk=$(( w * {BLOCKS} + k % {BLOCKS} ))
    $B printf "SOFTCARD-BLK %d %d\n" $w $k > /tmp/r$w
    if $B dd if=/tmp/r$w of=/dev/vda bs={BLOCK} seek=$blk count=1 oflag=direct conv=sync,fsync 2>/tmp/e$w; then
      echo "SOFTCARD-ACK $w $k"
    else
      echo "SOFTCARD-FAIL $w $k $($B cat /tmp/e$w)"
    fi
    k=$((k+1))
  done
}}
echo "SOFTCARD-START"
for w in 0 1 2 3; do writer $w & done
wait
echo "SOFTCARD-RESULT done"
$B poweroff -f
"#
    )
}

/// What happens to the card serving.
#[derive(Clone, Copy, Debug)]
enum Event {
    /// `softcard upgrade`.
    Upgrade,
    /// SIGKILL at a random moment, and a new card.
    Kill,
    /// A new card that kills itself just before an interrupt, and after
    /// it a new card.
    DieBeforeSignal,
    /// The VM paused (QMP `stop`: QEMU stops the ring with
    /// `GET_VRING_BASE`) and resumed (`cont`: the ring starts again).
    PauseResume,
}

#[test]
fn a_guest_loses_no_flushed_write_across_upgrades_and_crashes() {
    run(false, &[(Event::Upgrade, 20), (Event::Kill, 20)], 80);
}

#[test]
fn a_guest_listening_on_its_socket_takes_each_new_card_at_once() {
    run(
        true,
        &[
            (Event::Upgrade, 4),
            (Event::Kill, 4),
            (Event::PauseResume, 4),
        ],
        40,
    );
}

#[test]
fn a_guest_hears_of_answers_a_card_killed_before_signalling_them() {
    run(false, &[(Event::DieBeforeSignal, 4)], 30);
}

/// What `ss` says of the unix sockets at `path`: the listener (its
/// Recv-Q is the connections not yet accepted) and connections.
fn sockets_at(path: &std::path::Path) -> String {
    let out = std::process::Command::new("ss")
        .args(["-xap"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|e| format!("ss: {e}"));
    let p = path.to_string_lossy();
    out.lines()
        .filter(|l| l.starts_with("Netid") || l.contains(p.as_ref()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Volume `a` as the card's API lists it.
fn volume_a(d: &Daemon) -> serde_json::Value {
    d.volumes()
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "a")
        .unwrap()
        .clone()
}

/// Writes and flushes the card serving now has answered on volume `a`.
fn served_by_a(d: &Daemon) -> u64 {
    let a = volume_a(d);
    let m = &a["attachment"]["metrics"];
    m["write_ops"].as_u64().unwrap_or(0) + m["flush_ops"].as_u64().unwrap_or(0)
}

/// What the guest's writers have heard back, read off its console as it
/// comes: acknowledged records per writer, whether they have finished,
/// and the last lines (for a failure's message).
#[derive(Default)]
struct Heard {
    acks: [u64; WRITERS],
    done: bool,
    tail: std::collections::VecDeque<String>,
}

impl Heard {
    fn update(&mut self, guest: &Guest) {
        for l in guest.new_lines() {
            if let Some(rest) = l.strip_prefix("SOFTCARD-ACK ") {
                let w = rest.split_whitespace().next().and_then(|w| w.parse().ok());
                if let Some(n) = w.and_then(|w: usize| self.acks.get_mut(w)) {
                    *n += 1;
                }
            }
            self.done |= l.starts_with("SOFTCARD-RESULT");
            if self.tail.len() == 20 {
                self.tail.pop_front();
            }
            self.tail.push_back(l);
        }
    }
}

/// Waits (30 s at most) until the card serving has answered a request of
/// the guest's and every writer in the guest has had a record
/// acknowledged since the last call (or the writers have finished), or fails
/// with what each side shows. The guest's side catches a guest that the
/// card answers but that never hears of it (a lost interrupt) at the
/// event that lost it.
fn wait_served(d: &Daemon, guest: &Guest, heard: &mut Heard) {
    heard.update(guest);
    let (served, acks) = (served_by_a(d), heard.acks);
    let mut ok = false;
    for _ in 0..600 {
        heard.update(guest);
        // Writers that have finished (the guest printed its result) were
        // all heard to the end.
        let all_heard = heard.acks.iter().zip(acks).all(|(now, then)| *now > then);
        ok = heard.done || (served_by_a(d) > served && all_heard);
        if ok {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        ok,
        "for 30 s after the last event, the card answered {} more request(s) \
         and the writers heard of {:?} more record(s) (each must hear of one); {}",
        served_by_a(d).saturating_sub(served),
        heard
            .acks
            .iter()
            .zip(acks)
            .map(|(n, t)| n - t)
            .collect::<Vec<_>>(),
        both_sides(d, guest, heard)
    );
}

/// What the socket, QEMU, the card's rings and the guest's console show,
/// for a failure.
fn both_sides(d: &Daemon, guest: &Guest, heard: &mut Heard) -> String {
    heard.update(guest);
    format!(
        "the socket (a connection waiting in the listener's queue would \
         be the card's fault, none QEMU's):\n{}\nQEMU:\n{}\nthe card's rings: {}\n\
         the guest's last lines:\n{}",
        sockets_at(&d.path("a.sock")),
        guest.frontend_state(),
        volume_a(d)["attachment"]["rings"],
        heard.tail.iter().cloned().collect::<Vec<_>>().join("\n")
    )
}

/// `events` (each kind, how many) in a seeded random order while the
/// guest writes for `write_seconds`; `server`: QEMU listens and the card
/// connects.
fn run(server: bool, events: &[(Event, usize)], write_seconds: u32) {
    let k = softcard_testkit::kernel();
    let mut d = Daemon::start(
        "state_file = \"@DIR@/attachments.json\"\nrdma_socket = \"@DIR@/rdma.sock\"\n\
         [[device]]\nname = \"nvme0\"\nkind = \"file\"\npath = \"@DIR@/disk.img\"\nsize = \"64MiB\"\n\
         volatile_write_cache = { seed = 42 }\n",
    );
    d.ok(&[
        "card", "volume", "create", "a", "--device", "nvme0", "--size", "8MiB",
    ]);
    d.ok(&[
        "card", "volume", "create", "b", "--device", "nvme0", "--size", "8MiB",
    ]);
    let map = |d: &Daemon| -> Vec<(String, u64, u64)> {
        d.volumes()
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                (
                    v["name"].as_str().unwrap().to_owned(),
                    v["offset_bytes"].as_u64().unwrap(),
                    v["size_bytes"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let before = map(&d);
    // Volume b holds a pattern that nothing in this test may touch.
    let sentinel = pattern(0xb0b, 8 << 20);
    {
        let sb = d.path("b.sock");
        d.ok(&[
            "card",
            "volume",
            "attach",
            "b",
            "--vhost-user",
            sb.to_str().unwrap(),
        ]);
        let mut c = common::Client::connect(&sb, 1).unwrap();
        for (i, chunk) in sentinel.chunks(1 << 20).enumerate() {
            assert_eq!(c.write(0, (i << 20) as u64, chunk), 0);
        }
        assert_eq!(c.flush(0), 0);
    }
    let sa = d.path("a.sock");
    d.ok(&[
        "card",
        "volume",
        "attach",
        "a",
        if server {
            "--vhost-user-connect"
        } else {
            "--vhost-user"
        },
        sa.to_str().unwrap(),
    ]);
    let initrd = d.path("initrd.cpio");
    build_initramfs(&k, &initrd, &init_script(write_seconds), &[]);
    let chardev = if server {
        format!("socket,path={},server=on,wait=off", sa.display())
    } else {
        format!("socket,path={},reconnect=1", sa.display())
    };
    let guest = Guest::boot(&k, &initrd, &[(chardev, "num-queues=1".into())]);
    guest.wait_line("SOFTCARD-START");
    let mut heard = Heard::default();

    // Upgrades and crashes, shuffled, at random moments.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut order: Vec<Event> = events
        .iter()
        .flat_map(|&(e, n)| std::iter::repeat_n(e, n))
        .collect();
    for i in (1..order.len()).rev() {
        order.swap(i, usize::try_from(rnd() % (i as u64 + 1)).unwrap());
    }
    for event in order {
        // Each event once the guest's requests reach the card serving and
        // its writers hear back, so that a guest that stops sending or
        // hearing is caught at the event before.
        wait_served(&d, &guest, &mut heard);
        // QEMU negotiated EVENT_IDX: the card reads where the driver asked
        // to be interrupted.
        let rings = &volume_a(&d)["attachment"]["rings"];
        assert!(rings[0]["used_event"].is_u64(), "{rings}");
        std::thread::sleep(Duration::from_millis(100 + rnd() % 600));
        match event {
            Event::Upgrade => {
                d.upgrade();
            }
            Event::Kill => d.crash_and_restart(),
            Event::DieBeforeSignal => {
                d.crash_and_restart_with(&[("SOFTCARD_TEST_DIE_BEFORE_SIGNAL", "20")]);
                let deadline = std::time::Instant::now() + Duration::from_secs(60);
                while d.alive() {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "the card never reached its 20th interrupt; {}",
                        both_sides(&d, &guest, &mut heard)
                    );
                    std::thread::sleep(Duration::from_millis(10));
                }
                d.crash_and_restart();
            }
            Event::PauseResume => {
                guest.qmp("stop");
                std::thread::sleep(Duration::from_millis(100 + rnd() % 400));
                guest.qmp("cont");
            }
        }
    }
    wait_served(&d, &guest, &mut heard);
    let console = guest.console();
    assert!(console.contains("SOFTCARD-RESULT done"), "{console}");
    assert!(!console.contains("SOFTCARD-FAIL"), "{console}");
    for bad in ["I/O error", "blk_update_request", "critical medium error"] {
        assert!(!console.contains(bad), "the guest saw {bad:?}:\n{console}");
    }

    // The newest acknowledged record of each block.
    let mut acked: HashMap<usize, u64> = HashMap::new();
    let mut acks = 0;
    for l in console.lines() {
        let Some(rest) = l.strip_prefix("SOFTCARD-ACK ") else {
            continue;
        };
        let mut f = rest.split_whitespace().map(|v| v.parse::<u64>().unwrap());
        let (w, k) = (f.next().unwrap(), f.next().unwrap());
        let blk = usize::try_from(w).unwrap() * BLOCKS + usize::try_from(k).unwrap() % BLOCKS;
        let e = acked.entry(blk).or_default();
        *e = (*e).max(k);
        acks += 1;
    }
    eprintln!("{acks} flushed records acknowledged to the guest");
    assert!(acks > 100, "the writers barely ran:\n{console}");
    let a = volume_a(&d);
    if server {
        assert_eq!(
            a["attachment"]["interface"], "vhost-user-blk-connect",
            "{a}"
        );
    }
    // QEMU kept the inflight region across every card and handed it to
    // the one serving now; no region was refused.
    let m = &a["attachment"]["metrics"];
    assert_eq!(m["inflight_regions"], 1, "{a}");
    assert_eq!(m["inflight_refused"], 0, "{a}");

    let off_a = d.offset_of("a");
    let off_b = d.offset_of("b");
    assert_eq!(map(&d), before, "the partition map changed");
    d.stop();
    let disk = file_bytes(&d.path("disk.img"), off_a, WRITERS * BLOCKS * BLOCK);
    for (blk, newest) in &acked {
        let rec = &disk[blk * BLOCK..(blk + 1) * BLOCK];
        let line =
            String::from_utf8_lossy(&rec[..rec.iter().position(|&b| b == b'\n').unwrap_or(0)])
                .into_owned();
        let mut f = line.split_whitespace();
        assert_eq!(f.next(), Some("SOFTCARD-BLK"), "block {blk}: {line:?}");
        let w: usize = f.next().unwrap().parse().unwrap();
        let k: u64 = f.next().unwrap().parse().unwrap();
        assert_eq!(w, blk / BLOCKS, "block {blk} holds another writer's record");
        assert_eq!(
            usize::try_from(k).unwrap() % BLOCKS,
            blk % BLOCKS,
            "block {blk} holds record {k}"
        );
        assert!(
            k >= *newest,
            "block {blk} holds record {k}, older than the acknowledged {newest}"
        );
    }
    assert!(
        file_bytes(&d.path("disk.img"), off_b, 8 << 20) == sentinel,
        "volume b changed"
    );
}
