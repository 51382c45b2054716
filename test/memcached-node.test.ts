import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { MemcachedNode } from '../src/nodes/memcached.js'
import { MemoryNode } from '../src/nodes/memory.js'
import type { SessionNode } from '../src/nodes/node.js'
import { type MemcachedServer, startMemcached, stopAllMemcached } from './support/memcached.js'

describe.each([
  ['memcached', 'memcached'],
  ['the in-process development node', 'memory'],
] as const)('compare-and-set on %s', (_name, kind) => {
  let server: MemcachedServer
  let node: SessionNode

  beforeAll(async () => {
    if (kind === 'memcached') {
      server = await startMemcached()
      node = new MemcachedNode({
        id: 'n1',
        host: '127.0.0.1',
        port: server.port,
        operationTimeoutMs: 1000,
        probeKey: 'p',
      })
    } else {
      node = new MemoryNode('local')
    }
  })
  afterAll(async () => {
    await node.close()
    await stopAllMemcached()
  })

  it('writes only over the value it read', async () => {
    await node.set('k', Buffer.from('one'), 60)
    const first = await node.gets('k')
    expect(first?.value.toString()).toBe('one')
    expect(await node.setIfUnchanged('k', Buffer.from('two'), 60, first?.cas as never)).toBe('stored')
    // The token is now stale: someone (we) wrote since.
    expect(await node.setIfUnchanged('k', Buffer.from('three'), 60, first?.cas as never)).toBe('conflict')
    expect((await node.get('k'))?.toString()).toBe('two')
  })

  it('deletes only the value it read, and reports a value that is gone', async () => {
    await node.set('d', Buffer.from('mine'), 60)
    const mine = await node.gets('d')
    await node.set('d', Buffer.from('theirs'), 60)
    expect(await node.deleteIfUnchanged('d', mine?.cas as never)).toBe('conflict')
    const theirs = await node.gets('d')
    expect(await node.deleteIfUnchanged('d', theirs?.cas as never)).toBe('stored')
    expect(await node.gets('d')).toBeNull()
    expect(await node.setIfUnchanged('d', Buffer.from('x'), 60, theirs?.cas as never)).toBe('missing')
  })
})
