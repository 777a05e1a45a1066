// kinesalite's db.parseSequence, with native BigInt arithmetic in place of bignumber.js.
//
// Why: kinesalite parses the sequence number of every record it returns, and bignumber.js makes
// that the emulator's largest cost per record (about half its CPU in GetRecords). The benchmarks
// measure consumers, not the emulator, so the emulator should not be what limits them.
//
// Same algorithm and results as the original (kinesalite 3.3.3, MIT licence, (c) Michael Hart):
// the same result objects with the same keys in the same order, and the same errors. Anything
// but a plain string of digits goes to the original. tests/test_aws_emulators.py compares the
// two over generated and perturbed sequence numbers of every version.
'use strict'

module.exports = function install(db) {
  if (db.parseSequence.fast) return
  const original = db.parseSequence
  const POW_2_124 = 1n << 124n
  const POW_2_124_NEXT = (1n << 125n) * 16n
  const POW_2_185 = 1n << 185n
  const POW_2_185_NEXT = POW_2_185 * 3n / 2n
  const DIGITS = /^[0-9]+$/

  function parseSequence(seq) {
    if (typeof seq != 'string' || !DIGITS.test(seq)) return original(seq)
    let number = BigInt(seq)
    if (number < POW_2_124) number += POW_2_124
    const hex = number.toString(16)
    const version = number < POW_2_124_NEXT ? 0
      : (number > POW_2_185 && number < POW_2_185_NEXT) ? parseInt(hex.slice(hex.length - 1), 16) : null
    if (version == 2) {
      const seqIxHex = hex.slice(11, 27)
      let shardIxHex = hex.slice(38, 46)
      if (parseInt(seqIxHex[0], 16) > 7) throw new Error('Sequence index too high')
      if (parseInt(shardIxHex[0], 16) > 7) shardIxHex = '-' + shardIxHex
      const shardCreateSecs = parseInt(hex.slice(1, 10), 16)
      if (shardCreateSecs >= 16025175000) throw new Error('Date too large: ' + shardCreateSecs)
      return {
        shardCreateTime: shardCreateSecs * 1000,
        seqIx: BigInt('0x' + seqIxHex).toString(),
        byte1: hex.slice(27, 29),
        seqTime: parseInt(hex.slice(29, 38), 16) * 1000,
        shardIx: parseInt(shardIxHex, 16),
        version: version,
      }
    }
    if (version == 1) {
      return {
        shardCreateTime: parseInt(hex.slice(1, 10), 16) * 1000,
        byte1: hex.slice(11, 13),
        seqTime: parseInt(hex.slice(13, 22), 16) * 1000,
        seqRand: hex.slice(22, 36),
        seqIx: parseInt(hex.slice(36, 38), 16),
        shardIx: parseInt(hex.slice(38, 46), 16),
        version: version,
      }
    }
    if (version === 0) {
      const shardCreateSecs = parseInt(hex.slice(1, 10), 16)
      if (shardCreateSecs >= 16025175000) throw new Error('Date too large: ' + shardCreateSecs)
      return {
        shardCreateTime: shardCreateSecs * 1000,
        byte1: hex.slice(10, 12),
        seqRand: hex.slice(12, 28),
        shardIx: parseInt(hex.slice(28, 32), 16),
        version: version,
      }
    }
    throw new Error('Unknown version: ' + version)
  }

  parseSequence.fast = true
  parseSequence.original = original
  db.parseSequence = parseSequence
}
