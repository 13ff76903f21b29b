//! Bounds-checked access to fixed-size fields, so that header code can index fixed arrays with
//! constants (checked at compile time) after one fallible conversion.

/// `N` bytes of `b` at `off`, or `None` when they are not all there.
pub(crate) fn arr<const N: usize>(b: &[u8], off: usize) -> Option<&[u8; N]> {
    b.get(off..off.checked_add(N)?)?.try_into().ok()
}

/// Mutable [`arr`].
pub(crate) fn arr_mut<const N: usize>(b: &mut [u8], off: usize) -> Option<&mut [u8; N]> {
    b.get_mut(off..off.checked_add(N)?)?.try_into().ok()
}

/// Big-endian `u16` at `off`.
pub(crate) fn be16(b: &[u8], off: usize) -> Option<u16> {
    arr::<2>(b, off).map(|a| u16::from_be_bytes(*a))
}

/// Writes a big-endian `u16` at `off`; `None` when it does not fit.
pub(crate) fn put16(b: &mut [u8], off: usize, v: u16) -> Option<()> {
    *arr_mut::<2>(b, off)? = v.to_be_bytes();
    Some(())
}
