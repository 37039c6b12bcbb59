//! The on-disk record format of spool segments.
//!
//! A segment is a sequence of self-validating records:
//!
//! ```text
//! magic "PTRL" (4) | kind (1) | payload length u32 LE (4) | crc32 of kind+payload (4) | payload
//! ```
//!
//! Payloads:
//! * `Message`: queue id u64 LE | envelope length u32 LE | envelope JSON | message bytes
//! * `Update`:  queue id u64 LE | envelope JSON (recipients carry their new status)
//! * `Done`:    queue id u64 LE
//!
//! A record is valid only when all its bytes are present and the checksum matches, so a
//! record torn by a crash (a partial append) is detected and the scan stops there: a message
//! is never delivered half.

use crate::queue::QueueId;

pub const MAGIC: [u8; 4] = *b"PTRL";
pub const HEADER_LEN: usize = 13;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Message = 1,
    Update = 2,
    Done = 3,
}

impl Kind {
    fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(Kind::Message),
            2 => Some(Kind::Update),
            3 => Some(Kind::Done),
            _ => None,
        }
    }
}

/// Builds one record from payload parts (so a message body is copied once, into the record).
pub fn encode(kind: Kind, parts: &[&[u8]]) -> Vec<u8> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut record = Vec::with_capacity(HEADER_LEN + len);
    record.extend_from_slice(&MAGIC);
    record.push(kind as u8);
    record.extend_from_slice(&(len as u32).to_le_bytes());
    record.extend_from_slice(&[0; 4]);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&[kind as u8]);
    for part in parts {
        crc.update(part);
        record.extend_from_slice(part);
    }
    record[9..13].copy_from_slice(&crc.finalize().to_le_bytes());
    record
}

pub fn encode_message(id: QueueId, envelope_json: &[u8], message: &[&[u8]]) -> Vec<u8> {
    let id_bytes = id.0.to_le_bytes();
    let env_len = (envelope_json.len() as u32).to_le_bytes();
    let mut parts: Vec<&[u8]> = vec![&id_bytes, &env_len, envelope_json];
    parts.extend_from_slice(message);
    encode(Kind::Message, &parts)
}

pub fn encode_update(id: QueueId, envelope_json: &[u8]) -> Vec<u8> {
    encode(Kind::Update, &[&id.0.to_le_bytes(), envelope_json])
}

pub fn encode_done(id: QueueId) -> Vec<u8> {
    encode(Kind::Done, &[&id.0.to_le_bytes()])
}

/// Offset of the envelope JSON inside an encoded `Update` record.
pub const UPDATE_ENVELOPE_OFFSET: usize = HEADER_LEN + 8;

/// Offset of the message bytes inside an encoded `Message` record.
pub fn message_offset(envelope_len: usize) -> usize {
    HEADER_LEN + 8 + 4 + envelope_len
}

/// One record read back from a segment.
#[derive(Debug, PartialEq, Eq)]
pub struct Decoded<'a> {
    pub kind: Kind,
    pub id: QueueId,
    /// Envelope JSON for `Message` and `Update`, empty for `Done`.
    pub envelope: &'a [u8],
    /// Message bytes for `Message`, empty otherwise.
    pub message: &'a [u8],
    /// Offset of `message` from the start of the record.
    pub message_offset: usize,
    /// Total bytes of the record.
    pub len: usize,
}

/// Why decoding stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum Stop {
    /// Clean end of the data.
    End,
    /// Bytes that are not a whole valid record: a torn append, or corruption.
    Torn,
}

/// Decodes the record at the start of `data`.
pub fn decode(data: &[u8]) -> Result<Decoded<'_>, Stop> {
    if data.is_empty() {
        return Err(Stop::End);
    }
    if data.len() < HEADER_LEN || data[..4] != MAGIC {
        return Err(Stop::Torn);
    }
    let kind = Kind::from_byte(data[4]).ok_or(Stop::Torn)?;
    let len = u32::from_le_bytes([data[5], data[6], data[7], data[8]]) as usize;
    let crc = u32::from_le_bytes([data[9], data[10], data[11], data[12]]);
    let payload = data.get(HEADER_LEN..HEADER_LEN + len).ok_or(Stop::Torn)?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&[kind as u8]);
    hasher.update(payload);
    if hasher.finalize() != crc || payload.len() < 8 {
        return Err(Stop::Torn);
    }
    let id = QueueId(u64::from_le_bytes(
        payload[..8].try_into().map_err(|_| Stop::Torn)?,
    ));
    let rest = &payload[8..];
    let (envelope, message, message_offset) = match kind {
        Kind::Done => (&rest[..0], &rest[..0], HEADER_LEN + len),
        Kind::Update => (rest, &rest[..0], HEADER_LEN + len),
        Kind::Message => {
            let env_len = rest
                .get(..4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
                .ok_or(Stop::Torn)?;
            let envelope = rest.get(4..4 + env_len).ok_or(Stop::Torn)?;
            (envelope, &rest[4 + env_len..], message_offset(env_len))
        }
    };
    Ok(Decoded {
        kind,
        id,
        envelope,
        message,
        message_offset,
        len: HEADER_LEN + len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_truncation_is_detected() {
        let record = encode_message(
            QueueId(7),
            b"{\"e\":1}",
            &[b"Subject: x\r\n", b"\r\nbody\r\n"],
        );
        let decoded = decode(&record).expect("whole record decodes");
        assert_eq!(decoded.kind, Kind::Message);
        assert_eq!(decoded.id, QueueId(7));
        assert_eq!(decoded.envelope, b"{\"e\":1}");
        assert_eq!(decoded.message, b"Subject: x\r\n\r\nbody\r\n");
        assert_eq!(&record[decoded.message_offset..], decoded.message);
        assert_eq!(decoded.len, record.len());
        for cut in 1..record.len() {
            assert_eq!(decode(&record[..cut]), Err(Stop::Torn), "cut at {cut}");
        }
        assert_eq!(decode(&[]), Err(Stop::End));
    }

    #[test]
    fn flipped_bit_is_detected() {
        let mut record = encode_done(QueueId(9));
        assert_eq!(decode(&record).map(|d| d.id), Ok(QueueId(9)));
        let last = record.len() - 1;
        record[last] ^= 1;
        assert_eq!(decode(&record), Err(Stop::Torn));
    }
}
