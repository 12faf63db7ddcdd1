//! The frames of the message a client is sending, counted as its bytes are
//! read, before tungstenite puts the fragments together.
//!
//! tungstenite bounds a message's bytes (`limits.max_message_bytes`), not
//! its frames, and hands the session only whole messages: a client that
//! began a message and then sent nothing but empty continuation frames
//! (6 bytes each, masked) kept a core busy for as long as it liked, and no
//! message ever reached the rate limiter (review of 2026-12-03: 169 million
//! frames in 15 s, nothing counted, nothing closed, nothing said). A
//! message may come in [`MAX_FRAGMENTS`] frames, and one more for every
//! [`BYTES_PER_FRAME`] of payload it carried so far; in more, it is too
//! big: the session closes with 1009, as for one over the byte limit.
//! What costs the node is frames that carry little, and those meet the
//! fixed part. Chromium sends a message of up to about 128 KiB in one
//! frame and a larger one in frames of about 128 KiB (a review counted
//! 764 frames for 100 MB: with a fixed bound of 1,024 frames, a message
//! of 140 MB under a `limits.max_message_bytes` of 200 MB was refused);
//! the allowance per byte keeps any message within the byte limit clear
//! of the frame bound whatever size its frames are, down to 4 KiB.
//! Control frames between the pieces are not counted here: tungstenite
//! hands each to the session, which counts it against the message rate.
//!
//! The scanner reads only frame headers (2 to 14 bytes) and skips
//! payloads by their length, so it costs nothing per payload byte. It
//! trusts the stream no further than that: a malformed header is
//! tungstenite's to refuse (1002), and the scanner's count is then
//! moot.

use std::fmt;

/// The frames any client message may come in, whatever it carries.
pub(crate) const MAX_FRAGMENTS: u64 = 1024;

/// One frame more is allowed for each this many bytes of payload.
pub(crate) const BYTES_PER_FRAME: u64 = 4096;

/// A client message arrived in more than [`MAX_FRAGMENTS`] frames. Carried
/// as the source of the read's `io::Error`, so that the session can tell it
/// from a failed read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TooManyFragments;

impl fmt::Display for TooManyFragments {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "a message in more than {MAX_FRAGMENTS} frames and one per {BYTES_PER_FRAME} bytes"
        )
    }
}

impl std::error::Error for TooManyFragments {}

/// Whether `error` (a read's) says a message came in too many frames.
pub(crate) fn is_too_many(error: &std::io::Error) -> bool {
    error
        .get_ref()
        .is_some_and(|inner| inner.is::<TooManyFragments>())
}

/// Where the scanner stands in the client's byte stream.
#[derive(Debug, Default)]
pub(crate) struct Fragments {
    /// The header read so far: its first two bytes and the extended length
    /// (the masking key is skipped, not kept).
    header: [u8; 10],
    /// Header bytes seen of the frame being read (the masking key's
    /// included).
    have: u8,
    /// Payload bytes of the current frame still to skip.
    skip: u64,
    /// Data frames of the message being read so far.
    frames: u64,
    /// Payload bytes of those frames (the current one's included).
    bytes: u64,
    /// Said once; what follows is not scanned (the session is closing and
    /// reads what comes only to discard it).
    tripped: bool,
}

impl Fragments {
    /// Scans `bytes`, the next the client sent. `Err` once a message has
    /// come in more than [`MAX_FRAGMENTS`] frames (once only).
    pub(crate) fn scan(&mut self, mut bytes: &[u8]) -> Result<(), TooManyFragments> {
        while !bytes.is_empty() && !self.tripped {
            if self.skip > 0 {
                let n = usize::try_from(self.skip).map_or(bytes.len(), |s| s.min(bytes.len()));
                self.skip -= n as u64;
                bytes = &bytes[n..];
                continue;
            }
            let need = self.header_len();
            let take = usize::from(need - self.have).min(bytes.len());
            for &b in &bytes[..take] {
                if let Some(slot) = self.header.get_mut(usize::from(self.have)) {
                    *slot = b;
                }
                self.have += 1;
            }
            bytes = &bytes[take..];
            // The first two bytes tell how long the header is.
            if self.have == need && self.header_len() == need {
                self.frame()?;
            }
        }
        Ok(())
    }

    /// The header's length as far as it is known: 2 until its first two
    /// bytes are in, then with the extended length and the masking key.
    fn header_len(&self) -> u8 {
        if self.have < 2 {
            return 2;
        }
        let extended = match self.header[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if self.header[1] & 0x80 != 0 { 4 } else { 0 };
        2 + extended + mask
    }

    /// A whole header is in: count the frame, skip its payload.
    fn frame(&mut self) -> Result<(), TooManyFragments> {
        let [first, second, ..] = self.header;
        self.skip = match second & 0x7f {
            126 => u64::from(u16::from_be_bytes([self.header[2], self.header[3]])),
            127 => u64::from_be_bytes(
                self.header[2..10]
                    .try_into()
                    .expect("eight bytes of an eight-byte slice"),
            ),
            len => u64::from(len),
        };
        self.have = 0;
        let opcode = first & 0x0f;
        let fin = first & 0x80 != 0;
        if opcode & 0x08 != 0 {
            // A control frame, between pieces or not.
            return Ok(());
        }
        if opcode != 0 {
            // A text or binary frame starts a message.
            self.frames = 0;
            self.bytes = 0;
        }
        self.frames = self.frames.saturating_add(1);
        self.bytes = self.bytes.saturating_add(self.skip);
        if self.frames > MAX_FRAGMENTS.saturating_add(self.bytes / BYTES_PER_FRAME) {
            self.tripped = true;
            return Err(TooManyFragments);
        }
        if fin {
            self.frames = 0;
            self.bytes = 0;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame: `first` is FIN and opcode.
    fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![first];
        match payload.len() {
            n @ 0..=125 => out.push(0x80 | n as u8),
            n @ 126..=65535 => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&[1, 2, 3, 4]);
        out.extend_from_slice(payload);
        out
    }

    const TEXT: u8 = 0x01;
    const CONTINUATION: u8 = 0x00;
    const FIN: u8 = 0x80;
    const PING: u8 = 0x89;

    /// `count` frames of one message: a first text frame, continuations,
    /// the last with FIN.
    fn message_in(count: u64, piece: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for i in 0..count {
            let opcode = if i == 0 { TEXT } else { CONTINUATION };
            let fin = if i + 1 == count { FIN } else { 0 };
            out.extend(frame(opcode | fin, piece));
        }
        out
    }

    #[test]
    fn a_message_in_the_most_frames_allowed_passes_and_one_more_does_not() {
        let mut scan = Fragments::default();
        for _ in 0..3 {
            assert_eq!(scan.scan(&message_in(MAX_FRAGMENTS, b"ab")), Ok(()));
        }
        let mut scan = Fragments::default();
        assert_eq!(
            scan.scan(&message_in(MAX_FRAGMENTS + 1, b"")),
            Err(TooManyFragments)
        );
        // Once: what follows is read only to be discarded.
        assert_eq!(scan.scan(&message_in(MAX_FRAGMENTS + 1, b"")), Ok(()));
    }

    #[test]
    fn the_count_survives_any_split_of_the_bytes() {
        // Every length encoding, pings between the pieces, and the bytes
        // handed over one at a time: the same count as all at once.
        let mut bytes = frame(TEXT, &[b'x'; 200]);
        let mut payload = 200;
        let mut frames = 1;
        // Pieces up to the allowance: the fixed part and one frame per
        // 4 KiB carried (three pieces of 70,000 bytes: 51 more).
        while frames < MAX_FRAGMENTS + payload / BYTES_PER_FRAME {
            bytes.extend(frame(PING, b"p"));
            let piece: &[u8] = match frames % 3 {
                0 => b"",
                1 => &[b'y'; 126],
                _ if frames < 10 => &[b'z'; 70_000],
                _ => b"z",
            };
            bytes.extend(frame(CONTINUATION, piece));
            payload += piece.len() as u64;
            frames += 1;
        }
        assert!(frames > MAX_FRAGMENTS + 50, "{frames}");
        let last = frame(CONTINUATION | FIN, b"end");
        let mut whole = Fragments::default();
        assert_eq!(whole.scan(&bytes), Ok(()));
        assert_eq!((whole.frames, whole.bytes), (frames, payload));
        let mut bytewise = Fragments::default();
        for b in &bytes {
            assert_eq!(bytewise.scan(std::slice::from_ref(b)), Ok(()));
        }
        assert_eq!((bytewise.frames, bytewise.bytes), (frames, payload));
        // One more empty piece than allowed, then the end: refused either
        // way.
        let over = [frame(CONTINUATION, b""), last].concat();
        assert_eq!(whole.scan(&over), Err(TooManyFragments));
        for (i, b) in over.iter().enumerate() {
            let result = bytewise.scan(std::slice::from_ref(b));
            // The header of the extra piece is complete at its sixth byte.
            assert_eq!(result.is_err(), i == 5, "byte {i}");
        }
    }

    /// Chromium sends a message over about 128 KiB in frames of about
    /// 128 KiB: 1,100 of them (140 MB, under a byte limit of 200 MB) were
    /// refused by a bound of 1,024 frames (review of 2026-12-03).
    #[test]
    fn big_frames_earn_their_count() {
        let mut scan = Fragments::default();
        let piece = 128 * 1024;
        let zeros = vec![0u8; piece];
        for i in 0..1100 {
            let first = if i == 0 { TEXT } else { CONTINUATION };
            let mut header = vec![first, 0x80 | 127];
            header.extend_from_slice(&(piece as u64).to_be_bytes());
            header.extend_from_slice(&[0; 4]);
            assert_eq!(scan.scan(&header), Ok(()), "frame {i}");
            assert_eq!(scan.scan(&zeros), Ok(()));
        }
        // And 1-byte pieces earn almost nothing: refused soon after 1,024.
        let mut scan = Fragments::default();
        assert_eq!(scan.scan(&frame(TEXT, b"{")), Ok(()));
        let mut refused_at = None;
        for i in 2..2000 {
            if scan.scan(&frame(CONTINUATION, b"x")).is_err() {
                refused_at = Some(i);
                break;
            }
        }
        assert_eq!(refused_at, Some(MAX_FRAGMENTS + 1));
    }

    #[test]
    fn single_frame_messages_are_never_refused() {
        let mut scan = Fragments::default();
        let one = frame(TEXT | FIN, br#"{"action":"x"}"#);
        for _ in 0..(3 * MAX_FRAGMENTS) {
            assert_eq!(scan.scan(&one), Ok(()));
        }
        assert_eq!(scan.frames, 0);
    }

    #[test]
    fn a_huge_declared_length_is_skipped_without_overflow() {
        let mut scan = Fragments::default();
        let mut header = vec![TEXT, 0x80 | 127];
        header.extend_from_slice(&u64::MAX.to_be_bytes());
        header.extend_from_slice(&[0; 4]);
        assert_eq!(scan.scan(&header), Ok(()));
        assert_eq!(scan.scan(&[0; 4096]), Ok(()));
        assert_eq!(scan.skip, u64::MAX - 4096);
    }
}
