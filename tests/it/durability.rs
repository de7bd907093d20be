//! The real `kluis` binary in dev mode: `kill -9` during concurrent writes loses nothing that
//! was acknowledged; restarts keep data; no planted plaintext reaches the data dir or the logs;
//! an exposed master key file is refused; SIGTERM does not wait for health watchers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kluis::proto::records_client::RecordsClient;
use kluis::proto::{CreateRecordRequest, GetRecordRequest};
use tonic::transport::Channel;

use crate::helpers::*;

pub(crate) struct Process {
    pub(crate) child: Child,
    pub(crate) addr: String,
    log: PathBuf,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `kluis serve --dev --listen 127.0.0.1:0` in `dir`, logging to a file named `log_name`.
/// The child is killed and reaped when the returned `Process` drops.
#[allow(clippy::zombie_processes)]
pub(crate) fn start_dev(dir: &Path, log_name: &str) -> Process {
    let log = dir.join(log_name);
    let file = std::fs::File::create(&log).expect("log file");
    let child = Command::new(env!("CARGO_BIN_EXE_kluis"))
        .args(["serve", "--dev", "--listen", "127.0.0.1:0"])
        .current_dir(dir)
        .env("KLUIS_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .expect("spawn kluis");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains("kluis listening")) {
            let addr = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("local_addr="))
                .expect("address in log line")
                .to_string();
            return Process { child, addr, log };
        }
        assert!(Instant::now() < deadline, "kluis did not start: {text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(crate) fn dev_tokens(dir: &Path) -> BTreeMap<String, String> {
    #[derive(serde::Deserialize)]
    struct Tokens {
        tokens: BTreeMap<String, String>,
    }
    let text = std::fs::read_to_string(dir.join("keys/dev-tokens.toml")).expect("dev tokens");
    toml::from_str::<Tokens>(&text).expect("toml").tokens
}

async fn client(addr: &str, token: &str) -> Client {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    RecordsClient::with_interceptor(channel, bearer(token))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_concurrent_writes_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut process = start_dev(dir.path(), "run1.log");
    let tokens = dev_tokens(dir.path());
    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..16 {
        let mut c = client(&process.addr, &tokens["recruiter"]).await;
        let acked = Arc::clone(&acked);
        let stop = Arc::clone(&stop);
        writers.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let name = format!("Writer {w} record {n}");
                n += 1;
                let result = c
                    .create_record(CreateRecordRequest {
                        purpose: "recruitment".into(),
                        fields: fields(&[("full_name", text(&name))]),
                    })
                    .await;
                match result {
                    Ok(r) => acked
                        .lock()
                        .expect("lock")
                        .push((r.into_inner().record_id, name)),
                    Err(_) => break, // the server died mid-request: not acknowledged
                }
            }
        }));
    }
    // Let writes flow, then kill -9 while they are in flight.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    process.child.kill().expect("SIGKILL");
    process.child.wait().expect("reaped");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }
    let acked = acked.lock().expect("lock").clone();
    assert!(
        acked.len() > 50,
        "only {} writes acknowledged before the kill",
        acked.len()
    );

    let mut process = start_dev(dir.path(), "run2.log");
    let mut c = client(&process.addr, &tokens["recruiter"]).await;
    for (id, name) in &acked {
        let got = c
            .get_record(GetRecordRequest {
                record_id: id.clone(),
                purpose: "recruitment".into(),
                field_names: vec!["full_name".into()],
            })
            .await
            .unwrap_or_else(|e| panic!("acknowledged record {id} lost after kill -9: {e}"))
            .into_inner();
        assert_eq!(text_of(&got.fields["full_name"]), name);
    }
    eprintln!("{} acknowledged writes all survived kill -9", acked.len());
    let restart_log = std::fs::read_to_string(&process.log).expect("log");
    if let Some(line) = restart_log
        .lines()
        .find(|l| l.contains("replayed the write-ahead log"))
    {
        eprintln!("{line}");
    }
    process.child.kill().expect("stop");
    let _ = process.child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_planted_plaintext_reaches_the_data_dir_or_the_logs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut process = start_dev(dir.path(), "plain.log");
    let tokens = dev_tokens(dir.path());
    let marker = uuid::Uuid::new_v4().simple().to_string();
    let name = format!("Plantedname{marker}");
    let email = format!("planted.{marker}@example.nl");
    let cv = format!("%PDF-1.7 plantedcv{marker} {}", "lorem ipsum ".repeat(4000));
    let bsn = "111222333";
    let iban = "NL91ABNA0417164300";
    let mut recruiter = client(&process.addr, &tokens["recruiter"]).await;
    let mut payroll = client(&process.addr, &tokens["payroll"]).await;
    let id = recruiter
        .create_record(CreateRecordRequest {
            purpose: "recruitment".into(),
            fields: fields(&[
                ("full_name", text(&name)),
                ("email", text(&email)),
                ("cv_document", blob(cv.as_bytes(), "application/pdf")),
            ]),
        })
        .await
        .expect("create")
        .into_inner()
        .record_id;
    payroll
        .update_record(kluis::proto::UpdateRecordRequest {
            record_id: id.clone(),
            purpose: "payroll".into(),
            expected_revision: 0,
            set: fields(&[("bsn", text(bsn)), ("iban", text(iban))]),
            clear: vec![],
        })
        .await
        .expect("update");
    // Reads, searches and refused requests that carry the values, too.
    payroll
        .get_record(GetRecordRequest {
            record_id: id.clone(),
            purpose: "payroll".into(),
            field_names: vec![],
        })
        .await
        .expect("get");
    payroll
        .find_records(kluis::proto::FindRecordsRequest {
            purpose: "payroll".into(),
            field_name: "bsn".into(),
            value: bsn.into(),
        })
        .await
        .expect("find");
    let _ = payroll
        .find_records(kluis::proto::FindRecordsRequest {
            purpose: "payroll".into(),
            field_name: "bsn".into(),
            value: "111222334".into(),
        })
        .await;
    let _ = recruiter
        .create_record(CreateRecordRequest {
            purpose: "recruitment".into(),
            fields: fields(&[("email", text(&format!("bad {marker}")))]),
        })
        .await;
    let _ = recruiter
        .create_record(CreateRecordRequest {
            purpose: "recruitment".into(),
            fields: fields(&[(&format!("field{marker}"), text(&name))]),
        })
        .await;
    // The privacy officer's reasons are free text too (here with a BSN in it).
    let mut po = client(&process.addr, &tokens["privacy_officer"]).await;
    po.set_restriction(kluis::proto::SetRestrictionRequest {
        record_id: id.clone(),
        restricted: true,
        reason: format!("contested by Plantedreason{marker} BSN {bsn}"),
    })
    .await
    .expect("restrict");
    // Stop gracefully so that sled writes everything it keeps in memory to its files.
    let pid = process.child.id().to_string();
    Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill -TERM");
    let status = process.child.wait().expect("exit");
    assert!(status.success(), "graceful shutdown failed: {status}");

    let planted: Vec<&[u8]> = vec![
        name.as_bytes(),
        email.as_bytes(),
        marker.as_bytes(),
        bsn.as_bytes(),
        iban.as_bytes(),
        b"plantedcv",
        b"lorem ipsum lorem",
        b"Plantedreason",
    ];
    let mut files = Vec::new();
    collect_files(dir.path(), &mut files);
    let mut scanned = 0;
    for file in files
        .iter()
        .filter(|f| !f.starts_with(dir.path().join("keys")))
    {
        let bytes = std::fs::read(file).expect("read");
        scanned += bytes.len();
        for p in &planted {
            assert!(
                !bytes.windows(p.len()).any(|w| w == *p),
                "planted value {:?} found in {}",
                String::from_utf8_lossy(p),
                file.display()
            );
        }
    }
    let log = std::fs::read_to_string(&process.log).expect("log");
    assert!(
        log.contains("method=\"UpdateRecord\"") || log.contains("method=UpdateRecord"),
        "request lines are logged"
    );
    assert!(log.contains("bsn"), "field names are logged");
    assert!(
        scanned > cv.len(),
        "scanned only {scanned} bytes: the data was not written"
    );
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let p = entry.path();
        if p.is_dir() {
            collect_files(&p, out);
        } else {
            out.push(p);
        }
    }
}

#[test]
fn an_exposed_master_key_file_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("keys")).expect("keys");
    let key = dir.path().join("keys/master.key");
    std::fs::write(&key, format!("{}\n", "ab".repeat(32))).expect("write");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = Command::new(env!("CARGO_BIN_EXE_kluis"))
        .args(["serve", "--dev", "--listen", "127.0.0.1:0"])
        .current_dir(dir.path())
        .output()
        .expect("run");
    // Could not start: exit code 2 (as the tools, README "CLI").
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("accessible by group or others") && stderr.contains("chmod 600"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_health_watch_streams_and_stops_without_waiting_or_warning() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut process = start_dev(dir.path(), "watch.log");
    let channel = Channel::from_shared(format!("http://{}", process.addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    // Watchers of the overall status and of one service, as client-side health checking does.
    let mut streams = Vec::new();
    for service in ["", "kluis.v1.Records"] {
        let mut stream = tonic_health::pb::health_client::HealthClient::new(channel.clone())
            .watch(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("watch")
            .into_inner();
        let first = stream.message().await.expect("a status").expect("one");
        assert_eq!(first.status, ServingStatus::Serving as i32);
        streams.push(stream);
    }
    let stopping = Instant::now();
    let pid = process.child.id().to_string();
    Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill -TERM");
    // Each stream says NOT_SERVING, then ends.
    for mut stream in streams {
        let mut seen = Vec::new();
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            while let Ok(Some(m)) = stream.message().await {
                seen.push(m.status);
            }
        })
        .await;
        assert!(ended.is_ok(), "the watch stream did not end: {seen:?}");
        assert_eq!(seen, vec![ServingStatus::NotServing as i32]);
    }
    let status = tokio::task::spawn_blocking(move || {
        let status = process.child.wait().expect("exit");
        (status, process)
    })
    .await
    .expect("join");
    let (status, process) = status;
    assert!(status.success(), "graceful shutdown failed: {status}");
    // Not the 20 s grace period and the 5 s wait for the refusal recorder.
    assert!(
        stopping.elapsed() < Duration::from_secs(10),
        "stopped after {:?}",
        stopping.elapsed()
    );
    let log = std::fs::read_to_string(&process.log).expect("log");
    for warning in ["after the grace period", "may not all be recorded"] {
        assert!(!log.contains(warning), "{warning}: {log}");
    }
    // The last line says it stopped cleanly (review 25: a clean stop looked like a kill).
    assert!(
        log.lines()
            .last()
            .is_some_and(|l| l.contains("stopped cleanly")),
        "{log}"
    );
}

/// Opens an HTTP/2 connection and starts an authenticated CreateRecord whose body never
/// comes: a call that holds a graceful shutdown open. The socket is returned to keep it open.
fn stuck_call(addr: &str, token: &str) -> std::net::TcpStream {
    use std::io::Write;
    let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
        let len = u32::try_from(payload.len())
            .expect("short frame")
            .to_be_bytes();
        [&len[1..], &[kind, flags], &stream.to_be_bytes(), payload].concat()
    };
    // HPACK: each header a literal without indexing, with a new name; all shorter than 127.
    let mut block = Vec::new();
    let bearer = format!("Bearer {token}");
    for (name, value) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/kluis.v1.Records/CreateRecord"),
        (":authority", addr),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("authorization", bearer.as_str()),
    ] {
        block.push(0);
        for part in [name, value] {
            block.push(u8::try_from(part.len()).expect("short header"));
            block.extend_from_slice(part.as_bytes());
        }
    }
    let mut socket = std::net::TcpStream::connect(addr).expect("connect");
    socket
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .expect("preface");
    socket.write_all(&frame(4, 0, 0, &[])).expect("settings");
    // HEADERS on stream 1, END_HEADERS and no END_STREAM; then half a message.
    socket.write_all(&frame(1, 4, 1, &block)).expect("headers");
    socket
        .write_all(&frame(0, 0, 1, &[0, 0, 0, 0, 100, 1, 2, 3]))
        .expect("data");
    socket
}

/// A call that holds the shutdown open keeps the server for the grace period (20 s); a
/// second SIGTERM closes it at once, with a log line that says so (review 25: the second
/// signal was swallowed and nothing was logged).
#[test]
fn a_second_sigterm_closes_the_calls_that_hold_the_shutdown_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut process = start_dev(dir.path(), "second.log");
    let token = dev_tokens(dir.path())["recruiter"].clone();
    let _held = stuck_call(&process.addr, &token);
    std::thread::sleep(Duration::from_millis(500));
    let pid = process.child.id().to_string();
    let term = || {
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill -TERM")
    };
    let stopping = Instant::now();
    term();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        process.child.try_wait().expect("wait").is_none(),
        "the held call keeps the server in its grace period"
    );
    term();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = process.child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "no exit after the second SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    assert!(
        stopping.elapsed() < Duration::from_secs(12),
        "{:?}",
        stopping.elapsed()
    );
    let log = std::fs::read_to_string(&process.log).expect("log");
    assert!(log.contains("termination signal again"), "{log}");
    assert!(!log.contains("after the grace period"), "{log}");
}
