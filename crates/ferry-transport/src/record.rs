//! TLS 1.3 record protection (RFC 8446 §5) with ring's AEADs, for the traffic keys rustls
//! hands over after its handshake (`dangerous_extract_secrets`, the hook meant for kernel
//! TLS). This kernel has no kTLS, and rustls' buffered connection copies every record
//! several times and serialises a reading and a writing thread on one lock. Here each
//! direction is its own [`Sealer`] or [`Opener`]: the sender seals records in place in
//! the buffer it writes from, the receiver opens them in place in the buffer it read into.
//!
//! Only what Ferry's channels need: application data, and the `close_notify` alert.
//! Anything else from the peer (another alert, a post-handshake message such as a
//! KeyUpdate) ends the stream with an error naming it. Each direction refuses to go past
//! [`MAX_RECORDS`] records, below the AEAD's confidentiality limit, since without a
//! KeyUpdate its key cannot be renewed.

use std::io;

use ring::aead::{
    Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, AES_256_GCM, CHACHA20_POLY1305,
};
use rustls::ConnectionTrafficSecrets;

/// Record header length: content type, legacy version, length.
pub const HEADER_LEN: usize = 5;
/// Largest plaintext of one record.
pub const MAX_PLAINTEXT: usize = 1 << 14;
/// The AEAD tag.
pub const TAG_LEN: usize = 16;
/// Largest record body a peer may send (RFC 8446 §5.2).
pub const MAX_BODY: usize = MAX_PLAINTEXT + 256;
/// Records per key and direction: well under AES-GCM's limit of 2^24.5 full records.
pub const MAX_RECORDS: u64 = 1 << 24;

const APPLICATION_DATA: u8 = 23;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// One direction's key, static IV and record sequence number.
struct Keys {
    key: LessSafeKey,
    iv: [u8; 12],
    seq: u64,
}

impl Keys {
    fn new(seq: u64, secrets: ConnectionTrafficSecrets) -> io::Result<Keys> {
        let (alg, key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (&CHACHA20_POLY1305, key, iv),
            _ => {
                return Err(bad(
                    "the negotiated TLS cipher suite is not supported".into()
                ))
            }
        };
        let key = UnboundKey::new(alg, key.as_ref())
            .map_err(|_| bad("a TLS traffic key of the wrong length".into()))?;
        let iv: [u8; 12] = iv
            .as_ref()
            .try_into()
            .map_err(|_| bad("a TLS IV of the wrong length".into()))?;
        Ok(Keys {
            key: LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// The next record's nonce: the IV XOR the sequence number (RFC 8446 §5.3).
    fn next_nonce(&mut self) -> io::Result<Nonce> {
        if self.seq >= MAX_RECORDS {
            return Err(io::Error::other(
                "this TLS channel reached its record limit (2^24 records, 256 GiB): its key \
                 would have to be renewed, which Ferry does not do",
            ));
        }
        let mut n = self.iv;
        for (b, s) in n.iter_mut().skip(4).zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        self.seq += 1;
        Ok(Nonce::assume_unique_for_key(n))
    }
}

/// Seals records for sending.
pub struct Sealer(Keys);

impl Sealer {
    /// The transmit direction of extracted secrets.
    pub fn new(seq: u64, secrets: ConnectionTrafficSecrets) -> io::Result<Sealer> {
        Keys::new(seq, secrets).map(Sealer)
    }

    /// Seals one record of `len` plaintext bytes (filled by `fill`) into the front of
    /// `dst`, which must hold [`record_len`]`(len)` bytes; returns the record's length.
    pub fn seal_into(
        &mut self,
        dst: &mut [u8],
        content: u8,
        len: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> io::Result<usize> {
        let len = len.min(MAX_PLAINTEXT);
        let total = record_len(len);
        let dst = dst
            .get_mut(..total)
            .ok_or_else(|| io::Error::other("TLS record buffer too small"))?;
        let [hi, lo] = u16::try_from(total - HEADER_LEN)
            .unwrap_or(u16::MAX)
            .to_be_bytes();
        let header = [APPLICATION_DATA, 3, 3, hi, lo];
        dst[..HEADER_LEN].copy_from_slice(&header);
        let (body, tag_dst) = dst[HEADER_LEN..].split_at_mut(len + 1);
        fill(&mut body[..len]);
        body[len] = content;
        let nonce = self.0.next_nonce()?;
        let tag = self
            .0
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), body)
            .map_err(|_| io::Error::other("sealing a TLS record failed"))?;
        tag_dst.copy_from_slice(tag.as_ref());
        Ok(total)
    }
}

/// Bytes of a record holding `len` plaintext bytes: header, content, type byte, tag.
pub fn record_len(len: usize) -> usize {
    HEADER_LEN + len + 1 + TAG_LEN
}

/// Application data, the content type [`Sealer::seal_into`] takes for page data.
pub const DATA: u8 = APPLICATION_DATA;
/// The alert content type, with [`CLOSE_NOTIFY`] as its body.
pub const ALERT_TYPE: u8 = ALERT;
/// A `close_notify` alert's body: level warning (1), description close_notify (0).
pub const CLOSE_NOTIFY: [u8; 2] = [1, 0];

/// What one opened record held.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened {
    /// Application data: this range of the buffer given to [`Opener::open`].
    Data(std::ops::Range<usize>),
    /// The peer's `close_notify`: the end of its stream.
    Closed,
}

/// Opens received records.
pub struct Opener(Keys);

impl Opener {
    /// The receive direction of extracted secrets.
    pub fn new(seq: u64, secrets: ConnectionTrafficSecrets) -> io::Result<Opener> {
        Keys::new(seq, secrets).map(Opener)
    }

    /// The body length a record header announces (checked against the limit).
    pub fn body_len(header: &[u8; HEADER_LEN]) -> io::Result<usize> {
        let [kind, major, _, hi, lo] = *header;
        if kind != APPLICATION_DATA || major != 3 {
            return Err(bad(format!(
                "not a TLS 1.3 record (type {kind}, version {major}.x): the peer does not \
                 speak TLS, or the stream is corrupted"
            )));
        }
        let len = usize::from(u16::from_be_bytes([hi, lo]));
        if !(TAG_LEN + 1..=MAX_BODY).contains(&len) {
            return Err(bad(format!("a TLS record of {len} bytes is malformed")));
        }
        Ok(len)
    }

    /// Opens the record `record` (header and body) in place.
    pub fn open(&mut self, record: &mut [u8]) -> io::Result<Opened> {
        let (header, body) = record
            .split_first_chunk_mut::<HEADER_LEN>()
            .ok_or_else(|| bad("a truncated TLS record".into()))?;
        let header = *header;
        let nonce = self.0.next_nonce()?;
        let plain = self
            .0
            .key
            .open_in_place(nonce, Aad::from(header), body)
            .map_err(|_| {
                bad("a TLS record failed authentication: corrupted or forged in transit".into())
            })?;
        // Inner plaintext: content, the content type, then zero padding.
        let end = plain
            .iter()
            .rposition(|b| *b != 0)
            .ok_or_else(|| bad("a TLS record without a content type".into()))?;
        match plain[end] {
            APPLICATION_DATA => Ok(Opened::Data(HEADER_LEN..HEADER_LEN + end)),
            ALERT if plain[..end] == CLOSE_NOTIFY => Ok(Opened::Closed),
            ALERT => Err(bad(match plain[..end] {
                [_, d] => format!(
                    "received fatal alert: {:?}",
                    rustls::AlertDescription::from(d)
                ),
                _ => "received a malformed TLS alert".into(),
            })),
            HANDSHAKE => Err(bad(
                "the peer sent a TLS handshake message after the handshake (a KeyUpdate or a \
                 ticket), which Ferry's channels do not take"
                    .into(),
            )),
            t => Err(bad(format!("a TLS record of unknown content type {t}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::crypto::cipher::{AeadKey, Iv};

    /// Appends one record of `content` holding `body`.
    fn seal(s: &mut Sealer, out: &mut Vec<u8>, content: u8, body: &[u8]) -> io::Result<()> {
        let start = out.len();
        out.resize(start + record_len(body.len()), 0);
        let n = s.seal_into(&mut out[start..], content, body.len(), |b| {
            b.copy_from_slice(body)
        })?;
        out.truncate(start + n);
        Ok(())
    }

    fn secrets() -> ConnectionTrafficSecrets {
        ConnectionTrafficSecrets::Aes256Gcm {
            key: AeadKey::from([7u8; 32]),
            iv: Iv::from([9u8; 12]),
        }
    }

    #[test]
    fn records_round_trip_and_any_flip_is_refused() {
        let mut s = Sealer::new(0, secrets()).unwrap();
        let mut o = Opener::new(0, secrets()).unwrap();
        let mut out = Vec::new();
        seal(&mut s, &mut out, DATA, b"hello").unwrap();
        let len = Opener::body_len(out[..5].try_into().unwrap()).unwrap();
        assert_eq!(len, out.len() - HEADER_LEN);
        let mut copy = out.clone();
        let Opened::Data(r) = o.open(&mut copy).unwrap() else {
            panic!()
        };
        assert_eq!(&copy[r], b"hello");
        // The next record uses the next sequence number: a replay fails.
        let mut replayed = Opener::new(1, secrets()).unwrap();
        assert!(replayed.open(&mut out.clone()).is_err());
        // Any flipped bit fails authentication.
        for i in 0..out.len() {
            let mut o = Opener::new(0, secrets()).unwrap();
            let mut bad = out.clone();
            bad[i] ^= 0x10;
            assert!(o.open(&mut bad).is_err(), "byte {i}");
        }
        let mut c = Vec::new();
        seal(&mut s, &mut c, ALERT_TYPE, &CLOSE_NOTIFY).unwrap();
        assert_eq!(o.open(&mut c).unwrap(), Opened::Closed);
    }

    #[test]
    fn headers_are_checked() {
        assert!(
            Opener::body_len(&[22, 3, 1, 0, 40]).is_err(),
            "a handshake record"
        );
        assert!(
            Opener::body_len(&[23, 3, 3, 0x48, 0x01]).is_err(),
            "too long"
        );
        assert!(
            Opener::body_len(&[23, 3, 3, 0, 3]).is_err(),
            "shorter than a tag"
        );
        assert_eq!(Opener::body_len(&[23, 3, 3, 0, 40]).unwrap(), 40);
    }

    #[test]
    fn a_direction_stops_at_its_record_limit() {
        let mut s = Sealer::new(MAX_RECORDS - 1, secrets()).unwrap();
        let mut out = Vec::new();
        seal(&mut s, &mut out, DATA, &[1]).unwrap();
        let e = seal(&mut s, &mut out, DATA, &[1]).unwrap_err();
        assert!(e.to_string().contains("record limit"), "{e}");
    }
}
