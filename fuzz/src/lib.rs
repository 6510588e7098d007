//! What the fuzz targets share.

/// Cuts a fuzz input into the pieces a stream arrived in, so every target also checks that a
/// parser's answer does not depend on where the network or a pipe split its input. The first
/// byte seeds the piece lengths (1 to 97 bytes); the rest is the stream. Returns the pieces and
/// the whole stream.
pub fn split(data: &[u8]) -> (Vec<&[u8]>, &[u8]) {
    let Some((&seed, stream)) = data.split_first() else {
        return (Vec::new(), data);
    };
    let mut state = u32::from(seed);
    let mut pieces = Vec::new();
    let mut rest = stream;
    while !rest.is_empty() {
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let len = (1 + (state >> 16) % 97) as usize;
        let (piece, tail) = rest.split_at(len.min(rest.len()));
        pieces.push(piece);
        rest = tail;
    }
    (pieces, stream)
}
