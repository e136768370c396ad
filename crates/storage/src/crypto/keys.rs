//! Keys: per-volume data keys, tenants' key-encryption keys (KEKs), and the
//! wrapped-key record kept in a volume's partition-map entry.
//!
//! Plaintext keys live only in memory, in types that zero themselves on
//! drop and never print their bytes.

use std::collections::BTreeMap;
use std::path::PathBuf;

use aes::cipher::{BlockEncrypt, KeyInit};
use aes::Aes256;
use aes_kw::KekAes256;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// Bytes of an XTS-AES-256 data key (two AES-256 keys).
pub const DATA_KEY_BYTES: usize = 64;
/// Bytes of a key-encryption key.
pub const KEK_BYTES: usize = 32;
/// Bytes of a wrapped data key (RFC 3394 adds 8).
pub const WRAPPED_BYTES: usize = DATA_KEY_BYTES + 8;
/// Longest tenant name.
pub const MAX_TENANT_BYTES: usize = 32;

/// Key errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Wrong length or encoding.
    #[error("invalid key: {0}")]
    Invalid(String),
    /// The tenant has no key configured, or its source could not be read.
    #[error("no key-encryption key for tenant {tenant:?}: {reason}")]
    Missing {
        /// Tenant.
        tenant: String,
        /// Why.
        reason: String,
    },
    /// Unwrapping failed its integrity check: the KEK is not the one the
    /// data key was wrapped with.
    #[error("the key-encryption key of tenant {0:?} does not unwrap this volume's data key (wrong key?)")]
    WrongKey(String),
    /// Bad tenant name.
    #[error("invalid tenant name {0:?}: use 1-32 characters from A-Z a-z 0-9 . _ -")]
    TenantName(String),
}

/// A volume's XTS data key.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct DataKey([u8; DATA_KEY_BYTES]);

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

fn getrandom(buf: &mut [u8]) {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: writes at most `len - filled` bytes into `buf[filled..]`.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n > 0 {
            filled += n.unsigned_abs();
        }
    }
}

impl DataKey {
    /// A fresh random key from the kernel.
    pub fn generate() -> Self {
        let mut k = DataKey([0; DATA_KEY_BYTES]);
        getrandom(&mut k.0);
        k
    }

    /// A key from 64 bytes.
    pub fn from_bytes(b: &[u8]) -> Result<Self, KeyError> {
        let arr: [u8; DATA_KEY_BYTES] = b
            .try_into()
            .map_err(|_| KeyError::Invalid(format!("data key must be {DATA_KEY_BYTES} bytes")))?;
        Ok(DataKey(arr))
    }

    /// The key bytes (data half, then tweak half).
    pub fn bytes(&self) -> &[u8; DATA_KEY_BYTES] {
        &self.0
    }
}

/// A tenant's key-encryption key.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Kek([u8; KEK_BYTES]);

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Kek(check value {})", hex(&self.check_value()))
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Kek {
    /// A KEK from 32 bytes.
    pub fn from_bytes(b: &[u8]) -> Result<Self, KeyError> {
        let arr: [u8; KEK_BYTES] = b
            .try_into()
            .map_err(|_| KeyError::Invalid(format!("a key-encryption key is {KEK_BYTES} bytes")))?;
        Ok(Kek(arr))
    }

    /// A KEK from its text form: 64 hex digits (surrounding whitespace
    /// ignored).
    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        let t = text.trim();
        if t.len() != 2 * KEK_BYTES || !t.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(KeyError::Invalid(format!(
                "a key-encryption key is {} hex digits",
                2 * KEK_BYTES
            )));
        }
        let mut b = Zeroizing::new([0u8; KEK_BYTES]);
        for (i, o) in b.iter_mut().enumerate() {
            *o = u8::from_str_radix(&t[2 * i..2 * i + 2], 16).expect("checked hex");
        }
        Self::from_bytes(&b[..])
    }

    /// A fresh random KEK.
    pub fn generate() -> Self {
        let mut k = Kek([0; KEK_BYTES]);
        getrandom(&mut k.0);
        k
    }

    /// The text form (64 hex digits), for writing key files.
    pub fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex(&self.0))
    }

    /// Key check value: the first 8 bytes of AES-256 of a zero block under
    /// the KEK. Identifies which KEK wrapped a data key without revealing it.
    pub fn check_value(&self) -> [u8; 8] {
        let c = Aes256::new_from_slice(&self.0).expect("32-byte key");
        let mut b = aes::Block::default();
        c.encrypt_block(&mut b);
        b[..8].try_into().expect("8 bytes")
    }

    /// Wraps a data key (RFC 3394).
    pub fn wrap(&self, key: &DataKey) -> [u8; WRAPPED_BYTES] {
        let kek = KekAes256::from(self.0);
        let mut out = [0u8; WRAPPED_BYTES];
        kek.wrap(key.bytes(), &mut out)
            .expect("64-byte key wraps into 72 bytes");
        out
    }

    /// Unwraps a data key; fails when this is not the KEK that wrapped it.
    pub fn unwrap(&self, wrapped: &[u8; WRAPPED_BYTES], tenant: &str) -> Result<DataKey, KeyError> {
        let kek = KekAes256::from(self.0);
        let mut out = Zeroizing::new([0u8; DATA_KEY_BYTES]);
        kek.unwrap(wrapped, &mut out[..])
            .map_err(|_| KeyError::WrongKey(tenant.to_owned()))?;
        DataKey::from_bytes(&out[..])
    }
}

/// Checks a tenant name.
pub fn validate_tenant(name: &str) -> Result<(), KeyError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_TENANT_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(KeyError::TenantName(name.to_owned()))
    }
}

/// What a volume's partition-map entry records about its encryption.
///
/// Layout inside the entry's extension bytes (see docs/encryption.md):
/// `0..72` wrapped data key | `72..80` KEK check value | `80..112` tenant
/// name (UTF-8, zero padded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedKey {
    /// Tenant whose KEK wraps the key.
    pub tenant: String,
    /// Check value of that KEK.
    pub kek_check: [u8; 8],
    /// The RFC 3394-wrapped data key.
    pub wrapped: [u8; WRAPPED_BYTES],
}

/// Bytes of the record at the start of the extension area.
pub const RECORD_BYTES: usize = WRAPPED_BYTES + 8 + MAX_TENANT_BYTES;

impl WrappedKey {
    /// Encodes into the first [`RECORD_BYTES`] of `ext`.
    pub fn encode(&self, ext: &mut [u8]) {
        ext[..WRAPPED_BYTES].copy_from_slice(&self.wrapped);
        ext[WRAPPED_BYTES..WRAPPED_BYTES + 8].copy_from_slice(&self.kek_check);
        let name = &mut ext[WRAPPED_BYTES + 8..RECORD_BYTES];
        name.fill(0);
        name[..self.tenant.len()].copy_from_slice(self.tenant.as_bytes());
    }

    /// Decodes from extension bytes.
    pub fn decode(ext: &[u8]) -> Result<Self, KeyError> {
        if ext.len() < RECORD_BYTES {
            return Err(KeyError::Invalid("extension area too small".into()));
        }
        let name = &ext[WRAPPED_BYTES + 8..RECORD_BYTES];
        let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        let tenant = std::str::from_utf8(&name[..len])
            .map_err(|_| KeyError::Invalid("tenant name is not UTF-8".into()))?
            .to_owned();
        validate_tenant(&tenant)?;
        Ok(WrappedKey {
            tenant,
            kek_check: ext[WRAPPED_BYTES..WRAPPED_BYTES + 8]
                .try_into()
                .expect("8 bytes"),
            wrapped: ext[..WRAPPED_BYTES].try_into().expect("72 bytes"),
        })
    }
}

/// Where a tenant's KEK comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KekSource {
    /// A file holding 64 hex digits.
    File(PathBuf),
    /// An environment variable holding 64 hex digits.
    Env(String),
}

/// The card's tenants and their KEKs (current, and earlier ones still
/// needed after an interrupted rotation).
#[derive(Debug, Default)]
pub struct KeyStore {
    tenants: BTreeMap<String, Result<Vec<Kek>, String>>,
}

impl KeyStore {
    /// Loads each tenant's KEK from its source. A tenant whose key cannot
    /// be read is kept with the reason: its volumes refuse to attach.
    pub fn load(sources: &[(String, KekSource)]) -> Self {
        let mut tenants = BTreeMap::new();
        for (name, src) in sources {
            let key = match src {
                KekSource::File(p) => std::fs::read_to_string(p)
                    .map(Zeroizing::new)
                    .map_err(|e| format!("cannot read {}: {e}", p.display()))
                    .and_then(|t| Kek::from_hex(&t).map_err(|e| format!("{}: {e}", p.display()))),
                KekSource::Env(var) => std::env::var(var)
                    .map(Zeroizing::new)
                    .map_err(|_| format!("environment variable {var} is not set"))
                    .and_then(|t| Kek::from_hex(&t).map_err(|e| format!("${var}: {e}"))),
            };
            if let Err(e) = &key {
                log::warn!("tenant {name}: {e}");
            }
            tenants.insert(name.clone(), key.map(|k| vec![k]));
        }
        KeyStore { tenants }
    }

    /// A store with the given keys (tests, and the benchmark).
    pub fn with_keys(keys: Vec<(String, Kek)>) -> Self {
        KeyStore {
            tenants: keys.into_iter().map(|(n, k)| (n, Ok(vec![k]))).collect(),
        }
    }

    /// The tenant's current KEK.
    pub fn current(&self, tenant: &str) -> Result<&Kek, KeyError> {
        match self.tenants.get(tenant) {
            None => Err(KeyError::Missing {
                tenant: tenant.into(),
                reason: "the tenant is not in the configuration".into(),
            }),
            Some(Err(reason)) => Err(KeyError::Missing {
                tenant: tenant.into(),
                reason: reason.clone(),
            }),
            Some(Ok(keys)) => Ok(&keys[0]),
        }
    }

    /// Unwraps a volume's data key with whichever of the tenant's KEKs has
    /// the recorded check value.
    pub fn unwrap(&self, w: &WrappedKey) -> Result<DataKey, KeyError> {
        self.current(&w.tenant)?;
        let Some(Ok(keys)) = self.tenants.get(&w.tenant) else {
            unreachable!("checked by current()");
        };
        let kek = keys
            .iter()
            .find(|k| k.check_value() == w.kek_check)
            .ok_or_else(|| KeyError::WrongKey(w.tenant.clone()))?;
        kek.unwrap(&w.wrapped, &w.tenant)
    }

    /// Makes `new` the tenant's current KEK, keeping the earlier ones for
    /// data keys not yet re-wrapped.
    pub fn push_current(&mut self, tenant: &str, new: Kek) -> Result<(), KeyError> {
        self.current(tenant)?;
        if let Some(Ok(keys)) = self.tenants.get_mut(tenant) {
            keys.insert(0, new);
        }
        Ok(())
    }

    /// Forgets all but the current KEK once every data key uses it.
    pub fn retire_old(&mut self, tenant: &str) {
        if let Some(Ok(keys)) = self.tenants.get_mut(tenant) {
            keys.truncate(1);
        }
    }

    /// Tenant names, with an error for those without a usable key.
    pub fn tenants(&self) -> Vec<(String, Option<String>)> {
        self.tenants
            .iter()
            .map(|(n, k)| (n.clone(), k.as_ref().err().cloned()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_round_trips_and_wrong_key_is_detected() {
        let kek = Kek::generate();
        let dk = DataKey::generate();
        let w = kek.wrap(&dk);
        assert_eq!(kek.unwrap(&w, "t").unwrap().bytes(), dk.bytes());
        let other = Kek::generate();
        assert_eq!(
            other.unwrap(&w, "t").unwrap_err(),
            KeyError::WrongKey("t".into())
        );
    }

    #[test]
    fn rfc3394_vector_256_bit_kek() {
        // RFC 3394 4.6: wrap 256 bits of key data with a 256-bit KEK.
        let kek = Kek::from_hex("000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F")
            .unwrap();
        let akw = KekAes256::from(kek.0);
        let data = [
            0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xAA, 0xBB, 0xCC, 0xDD,
            0xEE, 0xFF, 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0A, 0x0B,
            0x0C, 0x0D, 0x0E, 0x0F,
        ];
        let mut out = [0u8; 40];
        akw.wrap(&data, &mut out).unwrap();
        assert_eq!(
            hex(&out),
            "28c9f404c4b810f4cbccb35cfb87f8263f5786e2d80ed326cbc7f0e71a99f43bfb988b9b7a02dd21"
        );
    }

    #[test]
    fn record_round_trips_through_extension_bytes() {
        let kek = Kek::generate();
        let w = WrappedKey {
            tenant: "acme".into(),
            kek_check: kek.check_value(),
            wrapped: kek.wrap(&DataKey::generate()),
        };
        let mut ext = [0u8; 148];
        w.encode(&mut ext);
        assert_eq!(WrappedKey::decode(&ext).unwrap(), w);
        assert!(Kek::from_hex("zz").is_err());
        assert!(validate_tenant("a/b").is_err());
    }

    #[test]
    fn key_store_reports_missing_sources() {
        let ks = KeyStore::load(&[
            (
                "a".into(),
                KekSource::Env("SOFTCARD_TEST_SURELY_UNSET".into()),
            ),
            ("b".into(), KekSource::File("/nonexistent/kek".into())),
        ]);
        assert!(matches!(ks.current("a"), Err(KeyError::Missing { .. })));
        assert!(matches!(ks.current("b"), Err(KeyError::Missing { .. })));
        assert!(matches!(ks.current("c"), Err(KeyError::Missing { .. })));
    }

    #[test]
    fn debug_output_never_shows_key_bytes() {
        let k = Kek::from_hex(&"ab".repeat(32)).unwrap();
        assert!(!format!("{k:?}").contains("abab"));
        let d = DataKey::from_bytes(&[0xcd; 64]).unwrap();
        assert!(!format!("{d:?}").contains("cdcd"));
    }
}
