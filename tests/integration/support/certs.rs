//! Certificates generated per test run: a CA, a server certificate for `localhost`, and a
//! second CA that signed nothing the server uses.

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

/// PEM texts for the TLS tests.
pub struct TestCerts {
    /// The CA that signed the server certificate.
    pub ca_pem: String,
    /// A CA unrelated to the server.
    pub other_ca_pem: String,
    /// The server certificate, valid for `localhost` only.
    pub server_cert_pem: String,
    /// The server's private key.
    pub server_key_pem: String,
}

fn new_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("ca key")).expect("ca cert")
}

impl TestCerts {
    /// Generates fresh keys and certificates.
    pub fn generate() -> Self {
        let ca = new_ca("walbust test CA");
        let other = new_ca("unrelated CA");
        let key = KeyPair::generate().expect("server key");
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("server params");
        params.distinguished_name.push(DnType::CommonName, "localhost");
        let cert = params.signed_by(&key, &ca).expect("server cert");
        TestCerts {
            ca_pem: ca.pem(),
            other_ca_pem: other.pem(),
            server_cert_pem: cert.pem(),
            server_key_pem: key.serialize_pem(),
        }
    }
}
