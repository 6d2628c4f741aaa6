//! Verify what a TLS endpoint serves: handshake, take the leaf certificate,
//! hash its DER. No validation of the chain: the question is only "is it
//! the certificate we just deployed?".

use std::sync::Arc;
use std::time::Duration;

use certdeploy_core::Digest;
use certdeploy_core::driver::Verifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
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
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Fetches the served leaf over TLS (rustls, ring), with a timeout.
pub struct TlsVerifier {
    config: Arc<rustls::ClientConfig>,
    timeout: Duration,
}

impl TlsVerifier {
    pub fn new(timeout: Duration) -> TlsVerifier {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map(|b| {
                b.dangerous().with_custom_certificate_verifier(Arc::new(AcceptAny(provider))).with_no_client_auth()
            })
            .unwrap_or_else(|_| unreachable_config());
        TlsVerifier { config: Arc::new(config), timeout }
    }

    async fn fetch(&self, endpoint: &str, sni: Option<&str>) -> Result<Digest, String> {
        let host = endpoint.rsplit_once(':').map(|(h, _)| h).unwrap_or(endpoint);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = sni.unwrap_or(host).to_string();
        let server_name = ServerName::try_from(name.clone()).map_err(|e| format!("invalid SNI `{name}`: {e}"))?;
        let tcp = tokio::net::TcpStream::connect(endpoint).await.map_err(|e| format!("{endpoint}: {e}"))?;
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        let tls = connector.connect(server_name, tcp).await.map_err(|e| format!("{endpoint}: TLS handshake: {e}"))?;
        let (_, conn) = tls.get_ref();
        let leaf = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or_else(|| format!("{endpoint}: no certificate presented"))?;
        Ok(Digest::of(leaf.as_ref()))
    }
}

fn unreachable_config() -> rustls::ClientConfig {
    // The ring provider always supports the default protocol versions.
    panic!("rustls ring provider lacks default protocol versions")
}

impl Verifier for TlsVerifier {
    async fn served_leaf(&self, endpoint: &str, sni: Option<&str>) -> Result<Digest, String> {
        crate::runtime::timed("verify", async {
            match tokio::time::timeout(self.timeout, self.fetch(endpoint, sni)).await {
                Ok(r) => r,
                Err(_) => Err(format!("{endpoint}: TLS handshake timed out after {} ms", self.timeout.as_millis())),
            }
        })
        .await
    }
}
