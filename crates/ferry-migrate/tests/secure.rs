//! Secure and checked channels without KVM: mutual TLS (accepted, and refused for plaintext,
//! foreign or missing certificates and a wrong name, with the source keeping the guest),
//! corruption caught by page checksums and by TLS, and compressed migrations.

mod common;

use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ferry_migrate::channel::Compression;
use ferry_migrate::recv::ReceiveParams;
use ferry_migrate::send::SendParams;
use ferry_migrate::{MigrateError, Status};
use ferry_proto::MessageKind as K;
use ferry_testkit::certs::Certs;
use ferry_testkit::fake::{FakeSource, FakeTarget};
use ferry_testkit::proxy::{Action, Dir, Fault, Proxy, RawFlip, Trigger};
use ferry_transport::{TlsConfig, Uri};

fn tls_dest(certs: &Certs) -> Dest {
    let params = ReceiveParams {
        tls: Some(TlsConfig::load(&certs.destination(), None).unwrap()),
        ..recv_params()
    };
    Dest::with(FakeTarget::new(MIB), params)
}

fn tls_params(dir: &std::path::Path, hostname: Option<&str>) -> SendParams {
    SendParams {
        tls: Some(TlsConfig::load(dir, hostname.map(String::from)).unwrap()),
        ..params()
    }
}

/// A source whose vCPU rewrites only its first 64 pages, so a page further in is sent once.
fn quiet_source() -> Arc<FakeSource> {
    FakeSource::start(MIB, 64, Duration::from_micros(200))
}

fn proxy_path() -> Uri {
    Uri::Unix(std::env::temp_dir().join(format!(
        "ferry-secure-{}-{:?}.sock",
        std::process::id(),
        std::thread::current().id()
    )))
}

#[test]
fn a_tls_migration_hands_the_guest_over() {
    let certs = Certs::make();
    let dst = tls_dest(&certs);
    let src = busy_source();
    let stats =
        completed(Migration::start(&src, &dst.uri, tls_params(&certs.source(), None)).finish());
    assert!(stats.tls, "{stats:?}");
    assert!(
        !stats.checksums,
        "TLS's AEAD covers integrity: no checksums on top"
    );
    assert_handed_over(&src, &dst.target);
}

/// Each refused source keeps its guest, and the destination goes on listening: a proper
/// source migrates afterwards.
#[test]
fn a_tls_destination_refuses_plaintext_foreign_certificates_and_wrong_names() {
    let certs = Certs::make();
    let dst = tls_dest(&certs);
    let cases: Vec<(&str, SendParams, &[&str])> = vec![
        ("plaintext", params(), &["accepts only mutual-TLS"]),
        (
            "another CA's certificate",
            tls_params(&certs.other_ca(), None),
            &["received fatal alert: UnknownCA"],
        ),
        (
            "a destination of another name",
            tls_params(&certs.source(), Some("elsewhere.example")),
            &["certificate not valid for name \"elsewhere.example\""],
        ),
    ];
    for (what, p, reasons) in cases {
        let src = quiet_source();
        let e = failed(Migration::start(&src, &dst.uri, p).finish()).to_string();
        eprintln!("{what}: {e}");
        assert!(reasons.iter().any(|r| e.contains(r)), "{what}: {e}");
        assert_source_owns(&src, &dst.target);
        dst.wait_status(Status::Listening, Duration::from_secs(5));
    }
    no_certificate_is_refused(&dst);
    let src = busy_source();
    completed(Migration::start(&src, &dst.uri, tls_params(&certs.source(), None)).finish());
    assert_handed_over(&src, &dst.target);
}

/// A TLS source and a destination started without TLS: refused with the reason on both
/// sides, the source keeps its guest.
#[test]
fn a_tls_source_and_a_plain_destination_do_not_talk() {
    let certs = Certs::make();
    let dst = Dest::start(MIB);
    let src = quiet_source();
    let e = failed(Migration::start(&src, &dst.uri, tls_params(&certs.source(), None)).finish());
    assert!(e.to_string().contains("does it expect TLS?"), "{e}");
    assert_source_owns(&src, &dst.target);
    dst.wait_status(Status::Listening, Duration::from_secs(5));
}

/// A TLS client that presents no certificate is told so and gets no further.
fn no_certificate_is_refused(dst: &Dest) {
    let Uri::Unix(path) = &dst.uri else {
        unreachable!()
    };
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AnyServer))
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    let sock = std::os::unix::net::UnixStream::connect(path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, sock);
    // The handshake completes on the client's side in TLS 1.3; the refusal comes next.
    let mut b = [0u8; 16];
    let r = tls.read(&mut b);
    let e = r.expect_err("a client without a certificate gets nothing but an alert");
    assert!(e.to_string().contains("CertificateRequired"), "{e}");
}

/// Trusts any server: the test is about the client's missing certificate.
#[derive(Debug)]
struct AnyServer;

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn nth(dir: Dir, kind: K, nth: u32, action: Action) -> Fault {
    Fault {
        when: Trigger::Frame { dir, kind, nth },
        action,
    }
}

/// A flipped bit in one page's data, which no length or count can reveal.
#[test]
fn a_flipped_page_byte_fails_a_checked_migration_naming_channel_and_offset() {
    let dst = Dest::start(MIB);
    let src = quiet_source();
    let p = proxy(
        &dst,
        vec![nth(Dir::ToDestination, K::Pages, 6, Action::CorruptLast)],
    );
    let e = failed(Migration::start(&src, &p.uri(), params()).finish());
    assert!(p.wait_fired(Duration::from_secs(1)), "the byte was flipped");
    let text = e.to_string();
    assert!(
        text.contains("arrived corrupted on data") && text.contains("stream offset"),
        "{text}"
    );
    assert_source_owns(&src, &dst.target);
}

/// Without checksums the same flip goes unnoticed: what the checksums are for.
#[test]
fn without_checksums_the_same_flip_corrupts_the_guest_silently() {
    let dst = Dest::start(MIB);
    let src = quiet_source();
    let p = proxy(
        &dst,
        vec![nth(Dir::ToDestination, K::Pages, 6, Action::CorruptLast)],
    );
    let unchecked = SendParams {
        checksums: false,
        ..params()
    };
    completed(Migration::start(&src, &p.uri(), unchecked).finish());
    let (a, b) = (src.digests(), dst.target.digests());
    assert_eq!(a.iter().zip(&b).filter(|(x, y)| x != y).count(), 1);
}

#[test]
fn a_corrupted_compressed_batch_fails_the_migration() {
    for c in [Compression::Zstd(3), Compression::Lz4] {
        let dst = Dest::start(MIB);
        let src = quiet_source();
        let p = proxy(
            &dst,
            vec![nth(
                Dir::ToDestination,
                K::Compressed,
                6,
                Action::CorruptLast,
            )],
        );
        let e = failed(Migration::start(&src, &p.uri(), with_compression(c)).finish());
        assert!(
            matches!(
                e,
                MigrateError::Receive { .. }
                    | MigrateError::CorruptBatch { .. }
                    | MigrateError::Peer { .. }
            ),
            "{c}: {e:?}"
        );
        let text = e.to_string();
        assert!(text.contains("corrupted"), "{c}: {text}");
        assert_source_owns(&src, &dst.target);
    }
}

/// Under TLS a flipped byte anywhere fails the record's authentication.
#[test]
fn a_flipped_byte_in_a_tls_stream_fails_the_migration() {
    let certs = Certs::make();
    let dst = tls_dest(&certs);
    let src = quiet_source();
    // Connection 1 is the first data channel; well past its handshake.
    let flip = RawFlip {
        connection: 1,
        offset: 3 << 20,
    };
    let p = Proxy::start_raw(&proxy_path(), dst.uri.clone(), flip).unwrap();
    let e = failed(Migration::start(&src, &p.uri(), tls_params(&certs.source(), None)).finish());
    assert!(p.wait_fired(Duration::from_secs(1)), "the byte was flipped");
    let text = e.to_string();
    assert!(text.contains("TLS record failed authentication"), "{text}");
    assert_source_owns(&src, &dst.target);
}

fn with_compression(c: Compression) -> SendParams {
    SendParams {
        compression: c,
        ..params()
    }
}

#[test]
fn compressed_migrations_hand_the_guest_over() {
    for c in [Compression::Zstd(1), Compression::Lz4, Compression::Auto] {
        let dst = Dest::start(MIB);
        let src = busy_source();
        let t = Instant::now();
        let stats = completed(Migration::start(&src, &dst.uri, with_compression(c)).finish());
        assert_handed_over(&src, &dst.target);
        assert_eq!(stats.compression, c.to_string());
        assert!(stats.checksums);
        if c != Compression::Auto {
            assert!(stats.batches_compressed > 0, "{c}: {stats:?}");
            // The fake's pages hold one word each: they shrink a lot.
            let raw = stats.pages_data * 4096;
            assert!(
                stats.bytes < raw / 4,
                "{c}: {} bytes for {raw}",
                stats.bytes
            );
        }
        eprintln!(
            "{c}: {:?}, {} compressed, {} raw batches",
            t.elapsed(),
            stats.batches_compressed,
            stats.batches_raw
        );
    }
}

#[test]
fn a_compressed_tls_migration_hands_the_guest_over() {
    let certs = Certs::make();
    let dst = tls_dest(&certs);
    let src = busy_source();
    let p = SendParams {
        compression: Compression::Zstd(1),
        ..tls_params(&certs.source(), None)
    };
    let stats = completed(Migration::start(&src, &dst.uri, p).finish());
    assert!(stats.tls && stats.batches_compressed > 0, "{stats:?}");
    assert_handed_over(&src, &dst.target);
}
