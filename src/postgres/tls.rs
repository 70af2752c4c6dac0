//! rustls client configuration with libpq `sslmode` semantics.
//!
//! | sslmode | chain checked | host name checked |
//! | --- | --- | --- |
//! | `disable`, `allow`, `prefer`, `require` | no (handshake signatures still are) | no |
//! | `require` with `sslrootcert` set | yes | no |
//! | `verify-ca` | yes | no |
//! | `verify-full` | yes | yes |
//!
//! `sslrootcert=system` uses the operating system's trust store. The same
//! configuration serves [`ReplicationConn`](super::ReplicationConn) (through
//! tokio-rustls) and [`connect_sql`](super::connect_sql) (through
//! `tokio_postgres_rustls::MakeRustlsConnect`).

use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::hash::HashAlgorithm;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::SourceError;
use super::conninfo::{ConnInfo, SslMode};
use crate::input::user_file::{self, Kind};

const ROOTCERT_HINT: &str = "set sslrootcert to the CA that signed the server certificate, or sslmode=require";

/// The ALPN protocol name Postgres 17+ expects (older servers ignore it).
const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// The sslmode after libpq's rule that `require` with a root certificate
/// behaves like `verify-ca`.
pub fn effective_sslmode(info: &ConnInfo) -> SslMode {
    match info.sslmode {
        SslMode::Require if info.sslrootcert.is_some() => SslMode::VerifyCa,
        mode => mode,
    }
}

/// The crypto provider in use: the process default if one is installed,
/// otherwise aws-lc-rs.
pub fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default().cloned().unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
}

/// Builds the rustls client configuration for `info` (reads `sslrootcert`,
/// `sslcert` and `sslkey` from disk).
pub fn client_config(info: &ConnInfo) -> Result<ClientConfig, SourceError> {
    let provider = provider();
    let algs = provider.signature_verification_algorithms;
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| config_error("could not set up tls protocol versions", Some(e.into())))?;

    let mode = effective_sslmode(info);
    let verifier: Arc<dyn ServerCertVerifier> = match mode {
        SslMode::Disable | SslMode::Allow | SslMode::Prefer | SslMode::Require => {
            Arc::new(AcceptAnyCertificate { algs })
        }
        SslMode::VerifyCa => Arc::new(ChainOnlyVerifier { roots: Arc::new(load_roots(info, mode)?), algs }),
        SslMode::VerifyFull => WebPkiServerVerifier::builder_with_provider(Arc::new(load_roots(info, mode)?), provider)
            .build()
            .map_err(|e| config_error("could not build the tls certificate verifier", Some(e.into())))?,
    };
    let builder = builder.dangerous().with_custom_certificate_verifier(verifier);

    let mut config = match (&info.sslcert, &info.sslkey) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), Some(key)) => {
            let certs = load_certs(cert, "sslcert")?;
            let key = load_key(key)?;
            builder.with_client_auth_cert(certs, key).map_err(|e| {
                config_error(&format!("sslcert `{cert}` and its sslkey cannot be used together"), Some(e.into()))
            })?
        }
        (Some(_), None) => {
            return Err(config_error(
                "sslcert is set but sslkey is not; give the client certificate's private key as sslkey",
                None,
            ));
        }
        (None, Some(_)) => {
            return Err(config_error("sslkey is set but sslcert is not; give the client certificate as sslcert", None));
        }
    };
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(config)
}

/// The TLS server name for `host`: an IP address (no SNI) or a DNS name.
/// `None` when the host is neither (only `verify-full` needs a real one).
pub fn server_name(host: &str) -> Option<ServerName<'static>> {
    ServerName::try_from(host.to_string()).ok()
}

fn config_error(message: &str, source: Option<super::BoxError>) -> SourceError {
    SourceError::Tls { host: String::new(), message: message.to_string(), source }
}

fn load_roots(info: &ConnInfo, mode: SslMode) -> Result<RootCertStore, SourceError> {
    let Some(path) = info.sslrootcert.as_deref() else {
        return Err(config_error(&format!("sslmode={mode} needs sslrootcert; {ROOTCERT_HINT}"), None));
    };
    let mut roots = RootCertStore::empty();
    if path == "system" {
        let found = rustls_native_certs::load_native_certs();
        let (added, _ignored) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            let cause = found.errors.into_iter().next().map(|e| e.into());
            return Err(config_error(
                &format!("sslrootcert=system found no usable certificates in the system trust store; {ROOTCERT_HINT}"),
                cause,
            ));
        }
        return Ok(roots);
    }
    for cert in load_certs(path, "sslrootcert")? {
        roots.add(cert).map_err(|e| {
            config_error(
                &format!("sslrootcert `{path}` holds a certificate rustls cannot use; {ROOTCERT_HINT}"),
                Some(e.into()),
            )
        })?;
    }
    Ok(roots)
}

fn load_certs(path: &str, key: &str) -> Result<Vec<CertificateDer<'static>>, SourceError> {
    let hint = if key == "sslrootcert" { format!("; {ROOTCERT_HINT}") } else { String::new() };
    let bytes = read_pem(path, key, &hint)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| config_error(&format!("{key} file `{path}` is not valid PEM{hint}"), Some(e.into())))?;
    if certs.is_empty() {
        return Err(config_error(&format!("{key} file `{path}` holds no PEM certificates{hint}"), None));
    }
    Ok(certs)
}

/// Reads a certificate or key file, a regular file of at most [`Kind::Pem`]'s cap.
fn read_pem(path: &str, key: &str, hint: &str) -> Result<Vec<u8>, SourceError> {
    user_file::read(Path::new(path), Kind::Pem).map_err(|e| {
        let what = if e.is_not_found() { "does not exist" } else { "cannot be used" };
        config_error(&format!("{key} file `{path}` {what}{hint}"), Some(e.into()))
    })
}

fn load_key(path: &str) -> Result<PrivateKeyDer<'static>, SourceError> {
    let bytes = read_pem(path, "sslkey", "")?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        pem::Error::NoItemsFound => config_error(&format!("sslkey file `{path}` holds no PEM private key"), None),
        e => config_error(&format!("sslkey file `{path}` is not valid PEM"), Some(e.into())),
    })
}

/// Encrypts without authenticating the server (libpq's `prefer`/`require`):
/// any certificate is accepted, but the handshake signatures must still be
/// valid for the certificate presented.
#[derive(Debug)]
struct AcceptAnyCertificate {
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Verifies the chain against the roots but not the host name (`verify-ca`).
#[derive(Debug)]
struct ChainOnlyVerifier {
    roots: Arc<RootCertStore>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ChainOnlyVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The `tls-server-end-point` channel binding data (RFC 5929) for the
/// server's certificate: its hash with the certificate's signature hash
/// (SHA-256 for MD5/SHA-1). `None` when that hash is not available (e.g.
/// SHA-512, Ed25519 or RSA-PSS certificates), in which case SCRAM runs
/// without channel binding.
pub fn tls_server_end_point(cert: &[u8], provider: &CryptoProvider) -> Option<Vec<u8>> {
    let wanted = signature_hash(cert)?;
    let hash = provider
        .cipher_suites
        .iter()
        .filter_map(|s| s.tls13())
        .map(|s| s.common.hash_provider)
        .find(|h| h.algorithm() == wanted)?;
    Some(hash.hash(cert).as_ref().to_vec())
}

/// The hash algorithm of an X.509 certificate's outer signature algorithm.
fn signature_hash(cert: &[u8]) -> Option<HashAlgorithm> {
    const RSA_PREFIX: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01];
    const ECDSA_SHA2_PREFIX: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03];

    let (0x30, certificate, _) = der_tlv(cert)? else {
        return None;
    };
    let (0x30, _tbs, rest) = der_tlv(certificate)? else {
        return None;
    };
    let (0x30, algorithm, _) = der_tlv(rest)? else {
        return None;
    };
    let (0x06, oid, _) = der_tlv(algorithm)? else {
        return None;
    };
    if let Some(&[last]) = oid.strip_prefix(RSA_PREFIX) {
        return match last {
            0x04 | 0x05 | 0x0b => Some(HashAlgorithm::SHA256),
            0x0c => Some(HashAlgorithm::SHA384),
            0x0d => Some(HashAlgorithm::SHA512),
            _ => None,
        };
    }
    if oid == ECDSA_SHA1 {
        return Some(HashAlgorithm::SHA256);
    }
    match oid.strip_prefix(ECDSA_SHA2_PREFIX)? {
        [0x02] => Some(HashAlgorithm::SHA256),
        [0x03] => Some(HashAlgorithm::SHA384),
        [0x04] => Some(HashAlgorithm::SHA512),
        _ => None,
    }
}

/// One DER tag-length-value: `(tag, contents, rest)`.
fn der_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn info(s: &str) -> ConnInfo {
        ConnInfo::parse(s, |_| None).unwrap()
    }

    #[test]
    fn require_with_root_is_verify_ca() {
        assert_eq!(effective_sslmode(&info("sslmode=require")), SslMode::Require);
        assert_eq!(effective_sslmode(&info("sslmode=require sslrootcert=/x")), SslMode::VerifyCa);
        assert_eq!(effective_sslmode(&info("sslmode=verify-full")), SslMode::VerifyFull);
    }

    #[test]
    fn verify_modes_need_a_root_certificate() {
        let err = client_config(&info("sslmode=verify-full")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "sslmode=verify-full needs sslrootcert; set sslrootcert to the CA that signed the server certificate, or sslmode=require"
        );
        let err = client_config(&info("sslmode=verify-ca sslrootcert=/nonexistent/ca.pem")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "sslrootcert file `/nonexistent/ca.pem` does not exist; set sslrootcert to the CA that signed the server certificate, or sslmode=require"
        );
        assert!(!err.is_transient());
        let err = client_config(&info("sslmode=require sslrootcert=/nonexistent/ca.pem")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ca.pem"));
    }

    #[test]
    fn non_verifying_modes_need_no_files() {
        for mode in ["disable", "allow", "prefer", "require"] {
            let config = client_config(&info(&format!("sslmode={mode}"))).unwrap();
            assert_eq!(config.alpn_protocols, [b"postgresql".to_vec()]);
        }
    }

    #[test]
    fn client_cert_needs_key() {
        let err = client_config(&info("sslcert=/x.pem")).unwrap_err();
        assert!(err.to_string().contains("sslkey is not"), "{err}");
        let err = client_config(&info("sslkey=/x.key")).unwrap_err();
        assert!(err.to_string().contains("sslcert is not"), "{err}");
    }

    #[test]
    fn loads_root_and_client_files() {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&ca_key).unwrap();
        let ca_path = dir.path().join("ca.pem");
        fs::write(&ca_path, ca.pem()).unwrap();
        let key_path = dir.path().join("client.key");
        fs::write(&key_path, ca_key.serialize_pem()).unwrap();
        let s = format!(
            "sslmode=verify-full sslrootcert={0} sslcert={0} sslkey={1}",
            ca_path.display(),
            key_path.display()
        );
        client_config(&info(&s)).unwrap();

        let empty = dir.path().join("empty.pem");
        fs::write(&empty, "").unwrap();
        let err = client_config(&info(&format!("sslmode=verify-ca sslrootcert={}", empty.display()))).unwrap_err();
        assert!(err.to_string().contains("holds no PEM certificates"), "{err}");
    }

    #[test]
    fn sslrootcert_dev_zero_is_refused_instead_of_read_until_out_of_memory() {
        let err = client_config(&info("sslmode=verify-ca sslrootcert=/dev/zero")).unwrap_err();
        let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
        assert!(chain.starts_with("sslrootcert file `/dev/zero` cannot be used; set sslrootcert"), "{chain}");
        assert!(
            chain.ends_with("PEM file /dev/zero is a device, not a regular file; give the path of a regular file"),
            "{chain}"
        );
        let err = client_config(&info("sslmode=require sslcert=/dev/urandom sslkey=/dev/zero")).unwrap_err();
        assert!(err.to_string().starts_with("sslcert file `/dev/urandom` cannot be used"), "{err}");
    }

    #[test]
    fn server_names() {
        assert!(matches!(server_name("127.0.0.1"), Some(ServerName::IpAddress(_))));
        assert!(matches!(server_name("::1"), Some(ServerName::IpAddress(_))));
        assert!(matches!(server_name("db.example.com"), Some(ServerName::DnsName(_))));
        assert!(server_name("bad name!").is_none());
    }

    #[test]
    fn end_point_hash_follows_the_signature_algorithm() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x".to_string()]).unwrap().self_signed(&key).unwrap();
        assert_eq!(signature_hash(cert.der()), Some(HashAlgorithm::SHA384));
        let digest = tls_server_end_point(cert.der(), &provider()).unwrap();
        assert_eq!(digest.len(), 48);

        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x".to_string()]).unwrap().self_signed(&key).unwrap();
        assert_eq!(tls_server_end_point(cert.der(), &provider()).unwrap().len(), 32);

        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x".to_string()]).unwrap().self_signed(&key).unwrap();
        assert_eq!(tls_server_end_point(cert.der(), &provider()), None);
        assert_eq!(signature_hash(b"\x30\x84garbage"), None);
        assert_eq!(signature_hash(b""), None);
    }
}
