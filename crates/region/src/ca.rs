//! The region's certificate authority: the trust anchor of every vGPU
//! port. A GPU server keeps its private key; it sends the region a
//! certificate signing request, and the region signs a short-lived server
//! certificate for the name the region gives it
//! ([`gpu_server_name`]), whatever names the request asked for. An instance
//! learns the authority's certificate and its vGPU's server name from its
//! metadata, and verifies the server with them.

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use serde::{Deserialize, Serialize};

/// How long a GPU server's certificate is valid. Servers ask again every
/// [`RENEW_AFTER`].
pub const SERVER_CERT_LIFETIME: std::time::Duration = std::time::Duration::from_secs(7 * 86_400);
/// How often a GPU server renews its certificate.
pub const RENEW_AFTER: std::time::Duration = std::time::Duration::from_secs(86_400);

/// The authority: its certificate and key, as stored under `/sc/v1/ca`.
#[derive(Clone, Serialize, Deserialize)]
pub struct Authority {
    /// PEM of the self-signed CA certificate (what instances trust).
    pub cert_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").finish_non_exhaustive()
    }
}

/// The TLS server name the region gives GPU server `name`.
pub fn gpu_server_name(name: &str) -> String {
    format!("{name}.vgpu.softcard.internal")
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl Authority {
    /// A new authority (ECDSA P-256), valid for 20 years.
    pub fn generate() -> Result<Self, String> {
        let key = KeyPair::generate().map_err(err)?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "softcard region vGPU authority");
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::hours(1);
        p.not_after = now + time::Duration::days(20 * 365);
        let cert = p.self_signed(&key).map_err(err)?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs `csr_pem` (whose signature must verify) as a TLS server
    /// certificate for `dns_name` only, valid for `lifetime`.
    pub fn sign_server(
        &self,
        csr_pem: &str,
        dns_name: &str,
        lifetime: std::time::Duration,
    ) -> Result<String, String> {
        if csr_pem.len() > 16 * 1024 {
            return Err("certificate signing request too large".into());
        }
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| format!("bad certificate signing request: {e}"))?;
        // The authority decides what the certificate says.
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, dns_name);
        p.distinguished_name = dn;
        p.subject_alt_names = vec![SanType::DnsName(dns_name.try_into().map_err(err)?)];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::minutes(5);
        p.not_after = now + time::Duration::try_from(lifetime).map_err(err)?;
        p.serial_number = Some(rand::random::<[u8; 16]>().to_vec().into());
        csr.params = p;
        let key = KeyPair::from_pem(&self.key_pem).map_err(err)?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, key).map_err(err)?;
        Ok(csr.signed_by(&issuer).map_err(err)?.pem())
    }
}

/// A fresh key pair and a signing request for it: (key PEM, CSR PEM).
/// The request names nothing: the region decides the name.
pub fn new_key_and_csr() -> Result<(String, String), String> {
    let key = KeyPair::generate().map_err(err)?;
    let p = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    let csr = p.serialize_request(&key).map_err(err)?;
    Ok((key.serialize_pem(), csr.pem().map_err(err)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_only_the_name_it_gives_and_refuses_garbage() {
        let ca = Authority::generate().unwrap();
        let (_, csr) = new_key_and_csr().unwrap();
        let pem = ca
            .sign_server(&csr, &gpu_server_name("gpu1"), SERVER_CERT_LIFETIME)
            .unwrap();
        let der = pem::parse(&pem).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(der.contents()).unwrap();
        let sans: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(sans, vec!["DNSName(gpu1.vgpu.softcard.internal)"]);
        assert!(!cert.is_ca());
        assert!(ca
            .sign_server("garbage", "x", SERVER_CERT_LIFETIME)
            .is_err());
        let mut tampered = csr.into_bytes();
        let n = tampered.len() / 2;
        tampered[n] = if tampered[n] == b'A' { b'B' } else { b'A' };
        assert!(ca
            .sign_server(
                &String::from_utf8(tampered).unwrap(),
                "x.vgpu.softcard.internal",
                SERVER_CERT_LIFETIME
            )
            .is_err());
    }
}
