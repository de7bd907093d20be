//! TLS and mTLS through rustls: the principal comes from the client certificate's common name.

use kluis::config::TlsSettings;
use kluis::crypto::SecretKey;
use kluis::keys::MasterKey;
use kluis::policy::{self, Policy};
use kluis::proto::records_client::RecordsClient;
use kluis::proto::{CreateRecordRequest, GetRecordRequest};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::Code;

use crate::helpers::*;

type Ca = CertifiedIssuer<'static, KeyPair>;

fn ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("ca")
}

/// A leaf certificate and key (PEM) signed by `ca`.
fn leaf(ca: &Ca, cn: &str, client: bool) -> (String, String) {
    let names = if client {
        vec![]
    } else {
        vec!["localhost".to_string(), "127.0.0.1".to_string()]
    };
    let mut params = CertificateParams::new(names).expect("params");
    params.distinguished_name.push(DnType::CommonName, cn);
    params.extended_key_usages = vec![if client {
        ExtendedKeyUsagePurpose::ClientAuth
    } else {
        ExtendedKeyUsagePurpose::ServerAuth
    }];
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, ca).expect("sign");
    (cert.pem(), key.serialize_pem())
}

struct TlsVault {
    _dir: tempfile::TempDir,
    running: kluis::server::Running,
    ca_pem: String,
}

const RECRUITER_TOKEN: &str = "kluis_tls-test-recruiter-token";
const SECURITY_TOKEN: &str = "kluis_tls-test-security-token";

async fn spawn_tls_vault(ca: &Ca, require_client_cert: bool) -> TlsVault {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert_pem, key_pem) = leaf(ca, "kluis.test", false);
    let mut policy = Policy::default_policy();
    policy
        .add_cert_principal("payroll-mtls", "payroll", "payroll.example.internal")
        .expect("principal");
    policy
        .add_token_hash(
            "recruitment-app",
            "recruiter",
            policy::token_hash(RECRUITER_TOKEN),
        )
        .expect("principal");
    policy
        .add_token_hash(
            "security-team",
            "security_officer",
            policy::token_hash(SECURITY_TOKEN),
        )
        .expect("principal");
    let master = MasterKey::from_secret(SecretKey::generate().expect("rng"));
    let mut settings = kluis::config::ephemeral(&dir.path().join("data"), master, policy);
    settings.tls = Some(TlsSettings {
        cert_pem: cert_pem.into_bytes(),
        key_pem: zeroize::Zeroizing::new(key_pem.into_bytes()),
        client_ca_pem: Some(ca.pem().into_bytes()),
        require_client_cert,
    });
    let running = kluis::server::start(settings)
        .await
        .expect("tls vault starts");
    TlsVault {
        _dir: dir,
        running,
        ca_pem: ca.pem(),
    }
}

impl TlsVault {
    async fn channel(
        &self,
        identity: Option<(String, String)>,
    ) -> Result<Channel, tonic::transport::Error> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .domain_name("localhost");
        if let Some((cert, key)) = identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        Channel::from_shared(format!(
            "https://127.0.0.1:{}",
            self.running.local_addr.port()
        ))
        .expect("uri")
        .tls_config(tls)?
        .connect()
        .await
    }
}

fn create_payroll_record() -> CreateRecordRequest {
    CreateRecordRequest {
        purpose: "payroll".into(),
        fields: fields(&[
            ("bsn", text("111222333")),
            ("iban", text("NL91ABNA0417164300")),
        ]),
    }
}

#[tokio::test]
async fn mtls_client_certificate_maps_to_its_role() {
    let ca = ca("Kluis test CA");
    let vault = spawn_tls_vault(&ca, false).await;
    let channel = vault
        .channel(Some(leaf(&ca, "payroll.example.internal", true)))
        .await
        .expect("mTLS connects");
    let mut payroll = RecordsClient::new(channel);
    let id = payroll
        .create_record(create_payroll_record())
        .await
        .expect("payroll by certificate")
        .into_inner()
        .record_id;
    let got = payroll
        .get_record(GetRecordRequest {
            record_id: id.clone(),
            purpose: "payroll".into(),
            field_names: vec![],
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(text_of(&got.fields["bsn"]), "111222333");
    // The certificate's role is payroll, not recruiter.
    assert_status(
        payroll
            .get_record(GetRecordRequest {
                record_id: id,
                purpose: "recruitment".into(),
                field_names: vec![],
            })
            .await,
        Code::PermissionDenied,
        &["recruitment"],
    );

    let channel = vault
        .channel(Some(leaf(&ca, "unknown.example.internal", true)))
        .await
        .expect("connects");
    let mut stranger = RecordsClient::new(channel);
    assert_status(
        stranger.create_record(create_payroll_record()).await,
        Code::Unauthenticated,
        &["certificate"],
    );
}

#[tokio::test]
async fn a_verified_client_certificate_without_a_common_name_is_told_so() {
    let ca = ca("Kluis test CA");
    let vault = spawn_tls_vault(&ca, false).await;
    // Chains to the client CA, names payroll only as a DNS subject alternative name.
    let mut params =
        CertificateParams::new(vec!["payroll.example.internal".to_string()]).expect("params");
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &ca).expect("sign");
    let channel = vault
        .channel(Some((cert.pem(), key.serialize_pem())))
        .await
        .expect("the handshake passes");
    let mut client = RecordsClient::new(channel);
    assert_status(
        client.create_record(create_payroll_record()).await,
        Code::Unauthenticated,
        &["client certificate has no common name (principals map by CN)"],
    );
}

#[tokio::test]
async fn a_tls_handshake_that_never_comes_is_dropped_after_the_timeout() {
    let ca = ca("Kluis test CA");
    let vault = spawn_tls_vault(&ca, false).await;
    let started = std::time::Instant::now();
    let socket = tokio::net::TcpStream::connect(vault.running.local_addr)
        .await
        .expect("connect");
    // Never sends a ClientHello: the server closes the connection once the handshake times
    // out (kluis::server::TLS_HANDSHAKE_TIMEOUT).
    let closed = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        let mut buf = [0u8; 64];
        loop {
            socket.readable().await?;
            match socket.try_read(&mut buf) {
                Ok(0) => return Ok::<_, std::io::Error>(()),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .expect("the server closed the connection");
    // A reset is as good as a close.
    let _ = closed;
    let waited = started.elapsed();
    assert!(
        waited >= kluis::server::TLS_HANDSHAKE_TIMEOUT - std::time::Duration::from_secs(1),
        "closed after {waited:?}"
    );
}

#[tokio::test]
async fn tls_with_a_bearer_token_and_without_a_client_certificate() {
    let ca = ca("Kluis test CA");
    let vault = spawn_tls_vault(&ca, false).await;
    let channel = vault.channel(None).await.expect("TLS connects");
    let mut recruiter = RecordsClient::with_interceptor(channel.clone(), bearer(RECRUITER_TOKEN));
    recruiter
        .create_record(CreateRecordRequest {
            purpose: "recruitment".into(),
            fields: fields(&[("full_name", text("Over TLS"))]),
        })
        .await
        .expect("token over TLS");
    let mut anonymous = RecordsClient::new(channel);
    assert_status(
        anonymous.create_record(create_payroll_record()).await,
        Code::Unauthenticated,
        &[],
    );

    // Plaintext HTTP/2 to the TLS port gets nowhere.
    let plain = Channel::from_shared(format!(
        "http://127.0.0.1:{}",
        vault.running.local_addr.port()
    ))
    .expect("uri");
    let result = match plain.connect().await {
        Ok(ch) => RecordsClient::with_interceptor(ch, bearer(RECRUITER_TOKEN))
            .create_record(CreateRecordRequest {
                purpose: "recruitment".into(),
                fields: fields(&[("full_name", text("x"))]),
            })
            .await
            .is_ok(),
        Err(_) => false,
    };
    assert!(
        !result,
        "a plaintext request was served by the TLS listener"
    );
}

#[tokio::test]
async fn required_client_certificates_and_foreign_cas_are_refused() {
    let ca_ = ca("Kluis test CA");
    let vault = spawn_tls_vault(&ca_, true).await;
    let works = vault
        .channel(Some(leaf(&ca_, "payroll.example.internal", true)))
        .await
        .expect("connects");
    RecordsClient::new(works)
        .create_record(create_payroll_record())
        .await
        .expect("certificate accepted");

    async fn refused(channel: Result<Channel, tonic::transport::Error>) -> bool {
        match channel {
            Err(_) => true,
            Ok(ch) => RecordsClient::new(ch)
                .create_record(create_payroll_record())
                .await
                .is_err(),
        }
    }
    assert!(
        refused(vault.channel(None).await).await,
        "no client certificate was accepted"
    );
    let other = ca("Some other CA");
    assert!(
        refused(
            vault
                .channel(Some(leaf(&other, "payroll.example.internal", true)))
                .await
        )
        .await,
        "a foreign CA's certificate was accepted"
    );
}

/// A certificate or key that cannot be used stops the start, naming the `[tls]` settings,
/// before any background work (a retention sweep, a key job) has run.
#[tokio::test]
async fn an_unusable_tls_key_stops_the_start_naming_the_setting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = ca("Kluis Test CA");
    let (cert_pem, _) = leaf(&ca, "kluis.test", false);
    let master = MasterKey::from_secret(SecretKey::generate().expect("rng"));
    let mut settings =
        kluis::config::ephemeral(&dir.path().join("data"), master, Policy::default_policy());
    settings.tls = Some(TlsSettings {
        cert_pem: cert_pem.into_bytes(),
        key_pem: zeroize::Zeroizing::new(
            b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n".to_vec(),
        ),
        client_ca_pem: None,
        require_client_cert: false,
    });
    let err = kluis::server::start(settings)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("[tls]") && err.contains("key_file"), "{err}");
}

/// Review 20: with client certificates required, the CLI presents one (`--client-cert`,
/// `--client-key`); without them it cannot connect, and a key file others can read is refused.
#[tokio::test]
async fn the_cli_presents_a_client_certificate_where_one_is_required() {
    use std::os::unix::fs::PermissionsExt;
    let ca_ = ca("Kluis test CA");
    let vault = spawn_tls_vault(&ca_, true).await;
    let files = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, text: &str, mode: u32| {
        let path = files.path().join(name);
        std::fs::write(&path, text).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        path.display().to_string()
    };
    let ca_file = write("ca.pem", &vault.ca_pem, 0o644);
    let (cert, key) = leaf(&ca_, "security.example.internal", true);
    let cert_file = write("client.pem", &cert, 0o644);
    let key_file = write("client.key", &key, 0o600);
    let server = format!("https://localhost:{}", vault.running.local_addr.port());
    let base = ["keys", "status", "--server", &server, "--ca-cert", &ca_file];

    let without = run_kluis(None, &base, Some(SECURITY_TOKEN)).await;
    assert_eq!(without.code, 2, "{}", without.all());
    let with_client = |cert: &str, key: &str| -> Vec<String> {
        base.iter()
            .copied()
            .chain(["--client-cert", cert, "--client-key", key])
            .map(str::to_string)
            .collect()
    };
    let with = with_client(&cert_file, &key_file);
    let run = run_kluis(None, &with, Some(SECURITY_TOKEN)).await;
    assert_eq!(run.code, 0, "{}", run.all());
    assert!(run.stdout.contains("identity"), "{}", run.all());

    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let loose = run_kluis(None, &with, Some(SECURITY_TOKEN)).await;
    assert_eq!(loose.code, 2, "{}", loose.all());
    assert!(
        loose.stderr.contains("--client-key") && loose.stderr.contains("chmod 600"),
        "{}",
        loose.all()
    );
    let half = run_kluis(
        None,
        &[&base[..], &["--client-cert", &cert_file]].concat(),
        Some(SECURITY_TOKEN),
    )
    .await;
    assert_eq!(half.code, 2, "{}", half.all());
    assert!(half.stderr.contains("--client-key"), "{}", half.all());
    // Review 21: a key of another certificate is named as such (not blamed on --ca-cert).
    let (_, other_key) = leaf(&ca_, "other.example.internal", true);
    let other_file = write("other.key", &other_key, 0o600);
    let run = run_kluis(
        None,
        &with_client(&cert_file, &other_file),
        Some(SECURITY_TOKEN),
    )
    .await;
    assert_eq!(run.code, 2, "{}", run.all());
    assert!(
        run.stderr.contains(&format!(
            "--client-key {other_file}: the private key does not belong to --client-cert {cert_file}"
        )),
        "{}",
        run.all()
    );
}

/// Review 20: an unusable TLS file is named, with what is wrong with it (tonic's one message
/// for all three said "peer sent no certificates" of the server's own certificate).
#[tokio::test]
async fn each_unusable_tls_file_is_named() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let out = kluis::config::init(&dir.path().join("etc"), "127.0.0.1:0").expect("init");
    let config = std::fs::read_to_string(&out.config_path).expect("config");
    let ca_ = ca("Kluis test CA");
    let (cert, key) = leaf(&ca_, "kluis.test", false);
    let (_, other_key) = leaf(&ca_, "other.test", false);
    let files = dir.path().join("pki");
    std::fs::create_dir(&files).expect("mkdir");
    let write = |name: &str, text: &str| {
        let path = files.join(name);
        std::fs::write(&path, text).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        path.display().to_string()
    };
    let (cert_file, key_file, ca_file) = (
        write("server.crt", &cert),
        write("server.key", &key),
        write("ca.crt", &ca_.pem()),
    );
    let junk = write("junk", "not a certificate\n");
    // Review 21: PEM framing around bytes that are no certificate or key.
    let framed_cert = write(
        "framed.crt",
        "-----BEGIN CERTIFICATE-----\nAAAAAAAA\n-----END CERTIFICATE-----\n",
    );
    let framed_key = write(
        "framed.key",
        "-----BEGIN PRIVATE KEY-----\nAAAAAAAA\n-----END PRIVATE KEY-----\n",
    );
    let other = write("other.key", &other_key);
    let load = |cert: &str, key: &str, ca: &str| {
        std::fs::write(
            &out.config_path,
            format!(
                "{config}\n[tls]\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\nclient_ca_file = \"{ca}\"\n"
            ),
        )
        .expect("write");
        kluis::config::load(&out.config_path)
    };
    for (cert, key, ca, named) in [
        (
            &junk,
            &key_file,
            &ca_file,
            format!("[tls] cert_file {junk}: holds no PEM certificate"),
        ),
        (
            &key_file,
            &key_file,
            &ca_file,
            format!("[tls] cert_file {key_file}: holds no PEM certificate"),
        ),
        (
            &cert_file,
            &junk,
            &ca_file,
            format!("[tls] key_file {junk}: holds no PEM private key"),
        ),
        (
            &cert_file,
            &key_file,
            &junk,
            format!("[tls] client_ca_file {junk}: holds no PEM certificate"),
        ),
        (
            &framed_cert,
            &key_file,
            &ca_file,
            format!("[tls] cert_file {framed_cert}: holds no PEM certificate"),
        ),
        (
            &cert_file,
            &key_file,
            &framed_cert,
            format!("[tls] client_ca_file {framed_cert}: holds no PEM certificate"),
        ),
        (
            &cert_file,
            &framed_key,
            &ca_file,
            format!("[tls] key_file {framed_key}: holds a private key that does not decode"),
        ),
    ] {
        let err = load(cert, key, ca).expect_err("refused").to_string();
        assert!(err.contains(&named), "{err}");
    }
    let settings = load(&cert_file, &other, &ca_file).expect("each file is well-formed");
    let err = kluis::server::start(settings)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("[tls] key_file: the private key does not belong to the certificate"),
        "{err}"
    );
}
