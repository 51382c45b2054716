import fc from 'fast-check'
import { describe, expect, it } from 'vitest'
import { decodeRecord, encodeRecord } from '../src/core/codec.js'
import { contentOf, snapshotOf } from '../src/core/serialize.js'
import { CorruptSessionError } from '../src/errors.js'

const record = fc.record({
  version: fc.nat({ max: 0xffffffff }),
  writtenAt: fc.integer({ min: 0, max: 4_102_444_800_000 }),
  cookieJson: fc.json(),
  dataJson: fc.json(),
})

describe('stored record codec', () => {
  it('round-trips every record', () => {
    fc.assert(
      fc.property(record, (r) => {
        expect(decodeRecord(encodeRecord(r))).toEqual(r)
      }),
    )
  })

  it('throws only CorruptSessionError on arbitrary bytes', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 200 }), (bytes) => {
        try {
          decodeRecord(Buffer.from(bytes))
        } catch (error) {
          expect(error).toBeInstanceOf(CorruptSessionError)
        }
      }),
    )
  })

  it('rejects a truncated blob', () => {
    const blob = encodeRecord({ version: 1, writtenAt: 1, cookieJson: '{"path":"/"}', dataJson: '{}' })
    expect(() => decodeRecord(blob.subarray(0, 20))).toThrow(CorruptSessionError)
  })
})

describe('session content', () => {
  it('keeps the cookie out of the data text, so a cookie refresh is not a change', () => {
    const expires = new Date(Date.now() + 1000)
    const cookie = { path: '/', expires }
    const a = snapshotOf({ cookie, cart: ['apple'] }, cookie)
    const b = snapshotOf({ cookie: { ...cookie, expires: new Date(0) }, cart: ['apple'] }, cookie)
    expect(a.dataJson).toBe('{"cart":["apple"]}')
    expect(a.dataJson).toBe(b.dataJson)
    expect(a.expires).toEqual(expires)
  })

  it('turns invalid stored JSON into CorruptSessionError', () => {
    expect(() => contentOf({ dataJson: '{', cookieJson: '{}' })).toThrow(CorruptSessionError)
    expect(() => contentOf({ dataJson: '[1]', cookieJson: '{}' })).toThrow(CorruptSessionError)
    expect(contentOf({ dataJson: '{"a":1}', cookieJson: '{}' })).toEqual({ data: { a: 1 }, cookie: {} })
  })
})
