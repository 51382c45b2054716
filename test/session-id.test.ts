import fc from 'fast-check'
import { describe, expect, it } from 'vitest'
import { formatSessionId, newRandomPart, parseSessionId, RANDOM_LENGTH } from '../src/session-id.js'

const nodeId = fc.stringMatching(/^[A-Za-z0-9_]{1,32}$/)

describe('session id codec', () => {
  it('issues 144-bit random parts of fixed length, all different', () => {
    const parts = new Set(Array.from({ length: 1000 }, newRandomPart))
    expect(parts.size).toBe(1000)
    for (const part of parts) expect(part).toMatch(/^[A-Za-z0-9_-]{24}$/)
    expect(RANDOM_LENGTH).toBe(24)
  })

  it('parses the node id back even when the random part contains dashes', () => {
    expect(parseSessionId('------------------------' + '-n1')).toEqual({
      random: '-'.repeat(24),
      nodeId: 'n1',
    })
    expect(parseSessionId(`${'a-b_'.repeat(6)}-node_7`)).toEqual({
      random: 'a-b_'.repeat(6),
      nodeId: 'node_7',
    })
  })

  it('round-trips any random part, node id and route', () => {
    fc.assert(
      fc.property(nodeId, fc.option(nodeId, { nil: undefined }), (node, route) => {
        const random = newRandomPart()
        expect(parseSessionId(formatSessionId(random, node, route))).toEqual({ random, nodeId: node, route })
      }),
    )
  })

  it('returns null, never throws, for anything that is not an id', () => {
    fc.assert(
      fc.property(fc.anything(), (value) => {
        const parsed = parseSessionId(value)
        if (parsed !== null) expect(typeof value).toBe('string')
      }),
    )
    fc.assert(
      fc.property(fc.string({ maxLength: 80 }), (text) => {
        const parsed = parseSessionId(text)
        if (parsed) expect(formatSessionId(parsed.random, parsed.nodeId, parsed.route)).toBe(text)
      }),
    )
  })

  it.each([
    ['empty', ''],
    ['no node', 'a'.repeat(24)],
    ['empty node', `${'a'.repeat(24)}-`],
    ['separator missing', `${'a'.repeat(24)}xn1`],
    ['random too short', `${'a'.repeat(23)}-n1`],
    ['host in node id', `${'a'.repeat(24)}-10.0.0.1:11211`],
    ['node id too long', `${'a'.repeat(24)}-${'n'.repeat(33)}`],
    ['control character', `${'a'.repeat(23)}\n-n1`],
    ['empty route', `${'a'.repeat(24)}-n1.`],
    ['two routes', `${'a'.repeat(24)}-n1.a.b`],
    ['route with a dash', `${'a'.repeat(24)}-n1.a-b`],
  ])('rejects %s', (_name, id) => {
    expect(parseSessionId(id)).toBeNull()
  })
})
