import fc from 'fast-check'
import { describe, expect, it } from 'vitest'
import { RecordCodec, type SessionRecord, sameBlob } from '../src/core/codec.js'
import { SessionSerializer } from '../src/core/serializer.js'
import { StoreKeyring } from '../src/core/store-keys.js'
import {
  CorruptSessionError,
  ForeignRecordError,
  UnknownStoreKeyError,
  UnserializableSessionError,
} from '../src/errors.js'

const DIGEST = 'a'.repeat(43)

const record: fc.Arbitrary<SessionRecord> = fc.record({
  version: fc.nat({ max: 0xffffffff }),
  writtenAt: fc.integer({ min: 0, max: 4_102_444_800_000 }),
  createdAt: fc.integer({ min: 0, max: 4_102_444_800_000 }),
  cookieJson: fc.json(),
  data: fc.uint8Array({ maxLength: 300 }).map((bytes) => Buffer.from(bytes)),
  format: fc.integer({ min: 0, max: 255 }),
})

const codecOf = (secrets: string[], encrypt = false) =>
  new RecordCodec({ keys: new StoreKeyring(secrets), encrypt })

/** Anything thrown must be the library's typed error for a bad blob. */
function decodesOrRejects(codec: RecordCodec, blob: Buffer, digest = DIGEST): SessionRecord | undefined {
  try {
    return codec.decode(blob, digest)
  } catch (error) {
    expect(error).toBeInstanceOf(CorruptSessionError)
    return undefined
  }
}

describe.each([false, true])('stored record codec (encrypt: %s)', (encrypt) => {
  const codec = codecOf(['the secret'], encrypt)

  it('recognizes a blob it wrote by its tag: a copy of it, never another write', () => {
    fc.assert(
      fc.property(record, record, fc.nat(), fc.integer({ min: 1, max: 255 }), (r, other, at, flip) => {
        const blob = codec.encode(r, DIGEST)
        const isBlob = sameBlob(blob)
        expect(isBlob(Buffer.from(blob))).toBe(true)
        // The next write of the session, even with nothing else changed; another session's record.
        expect(isBlob(codec.encode({ ...r, version: (r.version + 1) >>> 0 }, DIGEST))).toBe(false)
        const otherBlob = codec.encode(other, DIGEST)
        expect(isBlob(otherBlob)).toBe(otherBlob.equals(blob))
        const changed = Buffer.from(blob)
        const index = changed.length - 1 - (at % 16)
        changed[index] = (changed[index] as number) ^ flip
        expect(isBlob(changed)).toBe(false)
        expect(isBlob(blob.subarray(1))).toBe(false)
      }),
    )
  })

  it('round-trips every record, and knows its encoded length in advance', () => {
    fc.assert(
      fc.property(record, (r) => {
        const blob = codec.encode(r, DIGEST)
        expect(blob.length).toBe(codec.encodedLength(r))
        expect(codec.decode(blob, DIGEST)).toEqual(r)
      }),
    )
  })

  it('throws only CorruptSessionError on arbitrary bytes', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 300 }), (bytes) => {
        expect(decodesOrRejects(codec, Buffer.from(bytes))).toBeUndefined()
      }),
    )
  })

  it('rejects any single flipped bit, truncation or extension of a valid blob', () => {
    fc.assert(
      fc.property(record, fc.nat(), fc.integer({ min: 0, max: 7 }), (r, at, bit) => {
        const blob = codec.encode(r, DIGEST)
        const flipped = Buffer.from(blob)
        const index = at % blob.length
        flipped[index] = (flipped[index] as number) ^ (1 << bit)
        expect(decodesOrRejects(codec, flipped)).toBeUndefined()
        expect(decodesOrRejects(codec, blob.subarray(0, at % blob.length))).toBeUndefined()
        expect(decodesOrRejects(codec, Buffer.concat([blob, Buffer.from([at & 0xff])]))).toBeUndefined()
      }),
    )
  })

  it("rejects a valid record copied under another session's key", () => {
    const blob = codec.encode(
      { version: 1, writtenAt: 1, createdAt: 1, cookieJson: '{}', data: Buffer.from('{}'), format: 1 },
      DIGEST,
    )
    expect(() => codec.decode(blob, 'b'.repeat(43))).toThrow(CorruptSessionError)
  })

  it('rejects a record signed with a key it does not have, as an unknown key', () => {
    const blob = codecOf(['another secret'], encrypt).encode(
      { version: 1, writtenAt: 1, createdAt: 1, cookieJson: '{}', data: Buffer.from('{}'), format: 1 },
      DIGEST,
    )
    expect(() => codec.decode(blob, DIGEST)).toThrow(UnknownStoreKeyError)
  })

  it('marks a record written under a key that no longer writes, or with the other encrypt setting, for a rewrite', () => {
    const sample = {
      version: 1,
      writtenAt: 1,
      createdAt: 1,
      cookieJson: '{}',
      data: Buffer.from('{}'),
      format: 1,
    }
    expect(codec.decode(codec.encode(sample, DIGEST), DIGEST).rewrap).toBeUndefined()
    const rotated = codecOf(['new secret', 'the secret'], encrypt)
    expect(rotated.decode(codec.encode(sample, DIGEST), DIGEST).rewrap).toBe(true)
    const switched = codecOf(['the secret'], !encrypt)
    expect(switched.decode(codec.encode(sample, DIGEST), DIGEST).rewrap).toBe(true)
  })
})

describe('keys and encryption', () => {
  const sample: SessionRecord = {
    version: 3,
    writtenAt: 10,
    createdAt: 5,
    cookieJson: '{"path":"/"}',
    data: Buffer.from('{"cart":["a secret apple"]}'),
    format: 1,
  }

  it('keeps the data out of sight when encrypting, and only then', () => {
    expect(codecOf(['k']).encode(sample, DIGEST).includes('secret apple')).toBe(true)
    expect(codecOf(['k'], true).encode(sample, DIGEST).includes('secret apple')).toBe(false)
  })

  it('rotates keys: the first writes, every one reads, and either kind of record is read', () => {
    const old = codecOf(['old key'], true)
    const rotated = codecOf(['new key', 'old key'], true)
    const newOnly = codecOf(['new key'], true)
    const written = old.encode(sample, DIGEST)
    expect(rotated.decode(written, DIGEST)).toEqual({ ...sample, rewrap: true })
    const rewritten = rotated.encode(sample, DIGEST)
    expect(newOnly.decode(rewritten, DIGEST)).toEqual(sample)
    expect(() => old.decode(rewritten, DIGEST)).toThrow(UnknownStoreKeyError)
    // Turning encryption on or off never makes stored sessions unreadable.
    expect(codecOf(['new key']).decode(rewritten, DIGEST)).toEqual({ ...sample, rewrap: true })
    expect(newOnly.decode(codecOf(['new key']).encode(sample, DIGEST), DIGEST)).toEqual({
      ...sample,
      rewrap: true,
    })
  })

  it('uses a fresh IV for every write', () => {
    const codec = codecOf(['k'], true)
    expect(codec.encode(sample, DIGEST).equals(codec.encode(sample, DIGEST))).toBe(false)
  })
})

describe('serializers', () => {
  const rich = {
    when: new Date(1_700_000_000_000),
    tags: new Set(['a', 'b']),
    big: 12_345_678_901_234_567_890n,
    pattern: /ab+c/i,
    nested: { list: [1, 'two', null, { three: true }] },
  }

  it("'json' stores what express-session users store today, dates as strings", () => {
    const serializer = new SessionSerializer('json')
    const bytes = serializer.serialize({ cart: ['apple'], when: new Date(0), skipped: undefined })
    expect(bytes.toString()).toBe('{"cart":["apple"],"when":"1970-01-01T00:00:00.000Z"}')
    expect(serializer.deserialize(bytes, serializer.tag)).toEqual({
      cart: ['apple'],
      when: '1970-01-01T00:00:00.000Z',
    })
  })

  it("'v8' keeps Map, Set, Date, BigInt and RegExp", () => {
    const serializer = new SessionSerializer('v8')
    const data = { ...rich, byId: new Map([[1, { name: 'one' }]]) }
    expect(serializer.deserialize(serializer.serialize(data), serializer.tag)).toEqual(data)
  })

  it("'msgpack' keeps Map, Set, Date, BigInt, RegExp and cycles, readable by another process's serializer", () => {
    const writer = new SessionSerializer('msgpack')
    const cycle: Record<string, unknown> = { name: 'loop' }
    cycle.self = cycle
    const data = { ...rich, byId: new Map<unknown, unknown>([[{ k: 1 }, 'object key']]), cycle }
    writer.serialize({ warm: 'up' }) // an earlier message must not be needed to read a later one
    const reader = new SessionSerializer('msgpack')
    const back = reader.deserialize(writer.serialize(data), writer.tag) as typeof data
    expect(back).toEqual(data)
    expect(back.cycle.self).toBe(back.cycle)
  })

  it('takes a custom serializer that returns a string or bytes', () => {
    const upper = new SessionSerializer({
      serialize: (data) => JSON.stringify(data).toUpperCase(),
      deserialize: (bytes) => JSON.parse(bytes.toString().toLowerCase()),
    })
    expect(upper.serialize({ a: 'x' }).toString()).toBe('{"A":"X"}')
    expect(upper.deserialize(upper.serialize({ a: 'x' }), upper.tag)).toEqual({ a: 'x' })
    const bytes = new SessionSerializer({
      serialize: (data) => new TextEncoder().encode(JSON.stringify(data)),
      deserialize: (bytes) => JSON.parse(bytes.toString()),
    })
    expect(bytes.deserialize(bytes.serialize({ n: 1 }), bytes.tag)).toEqual({ n: 1 })
  })

  it('names a format it cannot read as foreign, not corrupt, so the copy is left for instances that can', () => {
    const json = new SessionSerializer('json')
    expect(() => json.deserialize(Buffer.from('{}'), 0)).toThrow(ForeignRecordError)
    expect(() => json.deserialize(Buffer.from('{}'), 77)).toThrow(ForeignRecordError)
  })

  it('reads data another serializer wrote, by the format stored with it', () => {
    const json = new SessionSerializer('json')
    const v8 = new SessionSerializer('v8')
    expect(v8.deserialize(json.serialize({ a: 1 }), json.tag)).toEqual({ a: 1 })
    expect(json.deserialize(v8.serialize({ a: 1 }), v8.tag)).toEqual({ a: 1 })
  })

  it('refuses what a format cannot store with UnserializableSessionError', () => {
    expect(() => new SessionSerializer('json').serialize({ big: 1n })).toThrow(UnserializableSessionError)
    const cycle: Record<string, unknown> = {}
    cycle.self = cycle
    expect(() => new SessionSerializer('json').serialize(cycle)).toThrow(UnserializableSessionError)
    expect(() => new SessionSerializer('v8').serialize({ fn: () => 1 })).toThrow(UnserializableSessionError)
  })

  it.each([
    'json',
    'v8',
    'msgpack',
  ] as const)("'%s' turns arbitrary stored bytes into CorruptSessionError, never another error", (name) => {
    const serializer = new SessionSerializer(name)
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 200 }), fc.integer({ min: 0, max: 255 }), (bytes, tag) => {
        try {
          const value = serializer.deserialize(Buffer.from(bytes), tag)
          expect(typeof value).toBe('object')
        } catch (error) {
          expect(error).toBeInstanceOf(CorruptSessionError)
        }
      }),
    )
  })

  it('keeps the cookie out of the data, so a cookie refresh is not a change', () => {
    const serializer = new SessionSerializer()
    const expires = new Date(Date.now() + 1000)
    const cookie = { path: '/', expires }
    const a = serializer.snapshot({ cookie, cart: ['apple'] }, cookie)
    const b = serializer.snapshot({ cookie: { ...cookie, expires: new Date(0) }, cart: ['apple'] }, cookie)
    expect(a.data.toString()).toBe('{"cart":["apple"]}')
    expect(a.data.equals(b.data)).toBe(true)
    expect(a.expires).toEqual(expires)
  })

  it('turns an unreadable stored cookie or non-object data into CorruptSessionError', () => {
    const serializer = new SessionSerializer()
    const record = (cookieJson: string, data: string) => ({ cookieJson, data: Buffer.from(data), format: 1 })
    expect(() => serializer.content(record('{', '{}'))).toThrow(CorruptSessionError)
    expect(() => serializer.content(record('{}', '[1]'))).toThrow(CorruptSessionError)
    expect(() => serializer.content(record('{}', '{'))).toThrow(CorruptSessionError)
    expect(serializer.content(record('{}', '{"a":1}'))).toEqual({ data: { a: 1 }, cookie: {} })
  })
})
