// A JPEG's EXIF orientation. Browsers show (and decode into a canvas) a photo turned as its
// EXIF orientation says, while the coordinator and the workers take its pixels as stored
// (Pillow, no transpose): a mask painted over the turned picture would land elsewhere. The
// page sends such a photo as a PNG of what it shows instead.

const SOI = 0xffd8;
const APP1 = 0xffe1;
const SOS = 0xffda;
const ORIENTATION_TAG = 0x0112;

/** The EXIF orientation (1-8) of a JPEG's bytes; 1 (as stored) without one. */
export function jpegOrientation(buffer) {
  const view = new DataView(buffer);
  if (view.byteLength < 4 || view.getUint16(0) !== SOI) return 1;
  let at = 2;
  while (at + 4 <= view.byteLength) {
    const marker = view.getUint16(at);
    const length = view.getUint16(at + 2);
    if ((marker & 0xff00) !== 0xff00 || marker === SOS) return 1;
    if (marker === APP1 && length >= 8 && at + 2 + length <= view.byteLength
        && view.getUint32(at + 4) === 0x45786966 /* "Exif" */) {
      return tiffOrientation(view, at + 10, at + 2 + length);
    }
    at += 2 + length;
  }
  return 1;
}

function tiffOrientation(view, start, end) {
  if (start + 8 > end) return 1;
  const little = view.getUint16(start) === 0x4949; // "II"
  const u16 = (offset) => view.getUint16(offset, little);
  const u32 = (offset) => view.getUint32(offset, little);
  const ifd = start + u32(start + 4);
  if (ifd + 2 > end) return 1;
  const entries = u16(ifd);
  for (let i = 0; i < entries; i++) {
    const entry = ifd + 2 + i * 12;
    if (entry + 12 > end) return 1;
    if (u16(entry) === ORIENTATION_TAG) {
      const value = u16(entry + 8);
      return value >= 1 && value <= 8 ? value : 1;
    }
  }
  return 1;
}
