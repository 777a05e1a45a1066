// Compares kinesalite-fast-sequence.js with kinesalite's own parseSequence; run by
// tests/test_aws_emulators.py. Prints "checked N mismatches M" and exits 1 on any mismatch.
'use strict'
const db = require('kinesalite/db')
const BigNumber = require('bignumber.js')
const original = db.parseSequence
require('./kinesalite-fast-sequence.js')(db)
const fast = db.parseSequence

const outcome = (parse, seq) => { try { return JSON.stringify(parse(seq)) } catch (e) { return 'error: ' + e.message } }
let checked = 0, mismatches = 0
function check(seq) {
  checked++
  const expected = outcome(original, seq), got = outcome(fast, seq)
  if (expected !== got && mismatches++ < 10) console.log('MISMATCH', JSON.stringify(seq), expected, got)
}

let seed = 7  // a fixed LCG: the same inputs on every run
const random = () => (seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648
const hexDigits = n => Array.from({length: n}, () => '0123456789abcdef'[Math.floor(random() * 16)]).join('')
const rounds = +(process.argv[2] || 20000)
for (let i = 0; i < rounds; i++) {  // what kinesalite itself writes, of every version, then perturbed
  const version = [0, 1, 2, undefined][i % 4]
  const fields = {
    version, shardCreateTime: Math.floor(random() * 2e12), seqTime: Math.floor(random() * 2e12),
    shardIx: Math.floor(random() * (i % 7 ? 100 : 2147483647)), byte1: hexDigits(2),
    seqIx: i % 4 == 1 ? Math.floor(random() * 256)
      : (i % 3 ? String(Math.floor(random() * 1e6)) : new BigNumber(hexDigits(15), 16).toFixed()),
    seqRand: version === 0 ? hexDigits(16) : hexDigits(14),
  }
  let seq
  try { seq = db.stringifySequence(fields) } catch (e) { continue }
  check(seq)
  check(outcome(db.incrementSequence, seq).replace(/"/g, ''))
  const digits = seq.split('')
  digits[Math.floor(random() * digits.length)] = String(Math.floor(random() * 10))
  check(digits.join(''))
  check(seq.slice(0, Math.floor(random() * seq.length)))
  check('0' + seq)
  check(seq + '7')
}
for (let i = 0; i < rounds; i++) {  // digit strings of any length
  check(Array.from({length: 1 + Math.floor(random() * 70)}, () => Math.floor(random() * 10)).join(''))
}
for (const odd of ['', ' ', '-1', '1e60', '0x10', '1.5', ' 123', '123 ', 'abc', 'NaN', 'Infinity', '+5', '00', '0',
  '49590338271490256608559692538361571095921575989136588898', 5, null, undefined, {}, []]) check(odd)
console.log('checked', checked, 'mismatches', mismatches)
process.exit(mismatches ? 1 : 0)
