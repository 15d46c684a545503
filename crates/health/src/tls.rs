//! TLS for checks, with libpq's `sslmode` meaning: `require` encrypts and
//! verifies the certificate chain only when `sslrootcert` is given (like
//! libpq, which then behaves as `verify-ca`: the host name is not checked).

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{ring, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read sslrootcert {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("sslrootcert {path} holds no usable certificate: write a PEM file of CA certificates")]
    Empty { path: String },
    #[error("sslrootcert {path} is not valid PEM ({detail}): write a PEM file of CA certificates")]
    Pem { path: String, detail: String },
    #[error("cannot set up TLS: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("cannot set up certificate verification: {0}")]
    Verifier(#[from] rustls::client::VerifierBuilderError),
}

/// Builds the connector the checkers use for `prefer` and `require`.
pub fn make_tls(sslrootcert: Option<&Path>) -> Result<MakeRustlsConnect, TlsError> {
    let provider = Arc::new(ring::default_provider());
    let verifier: Arc<dyn ServerCertVerifier> = match sslrootcert {
        Some(path) => Arc::new(VerifyCa(ca_verifier(path, provider.clone())?)),
        None => Arc::new(AnyCert(provider.clone())),
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

fn ca_verifier(path: &Path, provider: Arc<CryptoProvider>) -> Result<Arc<WebPkiServerVerifier>, TlsError> {
    let shown = path.display().to_string();
    let pem = std::fs::read(path).map_err(|source| TlsError::Read { path: shown.clone(), source })?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| TlsError::Pem { path: shown.clone(), detail: e.to_string() })?;
        roots.add(cert)?;
    }
    if roots.is_empty() {
        return Err(TlsError::Empty { path: shown });
    }
    Ok(WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider).build()?)
}

/// `sslmode=require` without a root certificate: encryption, no authentication.
#[derive(Debug)]
struct AnyCert(Arc<CryptoProvider>);

/// `sslmode=require` with `sslrootcert`: the chain must verify; the name need not.
#[derive(Debug)]
struct VerifyCa(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algs)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

impl ServerCertVerifier for VerifyCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed CA certificate (P-256, valid until 2126), for the tests only.
    const CA: &str = include_str!("test-ca.pem");

    fn file(name: &str, text: &str) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("pglb-tls-{}-{name}", std::process::id()));
        std::fs::write(&path, text).expect("write");
        path
    }

    #[test]
    fn a_ca_file_loads() {
        let path = file("good.pem", CA);
        assert!(make_tls(Some(&path)).is_ok());
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn a_broken_pem_section_is_an_error_naming_the_file() {
        // One good certificate, then a section cut short: not silently skipped.
        let path = file("cut.pem", &format!("{CA}-----BEGIN CERTIFICATE-----\nMIIB\n"));
        let err = make_tls(Some(&path)).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("not valid PEM") && err.contains(&path.display().to_string()), "{err}");
        let _ = std::fs::remove_file(path);
        let path = file("none.pem", "no certificate here\n");
        let err = make_tls(Some(&path)).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("holds no usable certificate"), "{err}");
        let _ = std::fs::remove_file(path);
    }
}
