import express from 'express'
import { afterEach, describe, expect, it } from 'vitest'
import type { SessionRecord } from '../src/core/codec.js'
import { storageKeys } from '../src/core/keys.js'
import type { ReplicatedStore } from '../src/core/store.js'
import { createEngine, type Engine } from '../src/create-engine.js'
import { StaleWriteError } from '../src/errors.js'
import { parseOptions } from '../src/options.js'
import { formatSessionId, newRandomPart, parseSessionId } from '../src/session-id.js'
import { Browser, type ShopApp, startShop } from './support/app.js'
import { backends, nodesFor, startBackend, stopAllServers } from './support/backends.js'
import { startCluster } from './support/memcached.js'
import { startWatchingProxy, type WatchingProxy } from './support/proxy.js'
import { JSON_FORMAT, recordsOf } from './support/records.js'

const SECRET = 'beside-secret'

/**
 * A locked write sends the backup's compare-and-set beside the primary's, on the backup token read with the
 * session. These tests stall one instance's traffic to the backup node to put the two writes of two instances
 * in the orders that could leave a losing copy on the backup.
 */
describe('the backup written beside the primary', () => {
  const engines: Engine[] = []
  const proxies: WatchingProxy[] = []
  const shops: ShopApp[] = []
  afterEach(async () => {
    await Promise.all(shops.splice(0).map((shop) => shop.close()))
    await Promise.all(engines.splice(0).map((engine) => engine.close({ timeout: 0 })))
    await Promise.all(proxies.splice(0).map((proxy) => proxy.close()))
    await stopAllServers()
  })

  const record = (version: number, by: string, writtenAt = Date.now()): SessionRecord => ({
    version,
    writtenAt,
    createdAt: writtenAt,
    cookieJson: '{"path":"/"}',
    data: Buffer.from(JSON.stringify({ by })),
    format: JSON_FORMAT,
  })

  /**
   * Two instances on nodes n1 and n2 and a session stored on both (primary n1, backup n2): `locked` writes the
   * way a request holding the lock does, `other` the way an unlocked request does. The one named `stalled`
   * reaches n2 through a proxy that can hold its requests.
   */
  async function twoInstances(backend: (typeof backends)[number], stalled: 'locked' | 'other') {
    const servers = await startBackend(backend, 2)
    const n2 = servers[1] as (typeof servers)[number]
    const proxy = await startWatchingProxy(n2.port, {})
    proxies.push(proxy)
    const viaProxy = nodesFor([servers[0] as (typeof servers)[number], { ...n2, port: proxy.port }])
    const engine = (name: 'locked' | 'other') => {
      const created = createEngine(
        parseOptions({
          secret: SECRET,
          nodes: name === stalled ? viaProxy : nodesFor(servers),
          lockingMode: name === 'locked' ? 'all' : 'merge',
          operationTimeout: 3000,
        }),
      )
      engines.push(created)
      return created
    }
    const locked = engine('locked')
    const other = engine('other')
    const id = formatSessionId(newRandomPart(), 'n1')
    await storeOf(locked).save(id, record(1, 'first'), 60)
    const keys = storageKeys('sf:', parseSessionId(id)?.random as string)
    /** Who wrote the copy a node holds, read on the locked instance's own connection: after all it sent there. */
    const writerOf = async (nodeId: string, key: string) => {
      const blob = await locked.ring.call(nodeId, (node) => node.get(key))
      return blob && recordsOf(SECRET).dataOf<{ by: string }>(id, blob).by
    }
    return {
      proxy,
      locked,
      other,
      id,
      backup: keys.backup,
      backupBy: () => writerOf('n2', keys.backup),
      primaryBy: () => writerOf('n1', keys.primary),
    }
  }

  const storeOf = (engine: Engine) => engine.session.store as ReplicatedStore

  it.each(
    backends,
  )("a copy that lost on the primary is replaced by the winner's on the backup (%s)", async (backend) => {
    const { proxy, locked, other, id, backupBy, primaryBy } = await twoInstances(backend, 'other')
    const mine = await storeOf(locked).load(id, { readBackup: true })
    const theirs = await storeOf(other).load(id)
    // The other instance wins the primary; its backup write is stalled on the way.
    proxy.hold()
    const winning = storeOf(other).save(id, record(2, 'other', Date.now() - 1000), 60, {
      ifUnchanged: theirs?.cas,
      backupIfOlder: true,
    })
    for (let i = 0; i < 200 && (await primaryBy()) !== 'other'; i++) await sleep(5)
    expect(await primaryBy()).toBe('other')

    await expect(
      storeOf(locked).save(id, record(2, 'locked'), 60, { ifUnchanged: mine?.cas }),
    ).rejects.toBeInstanceOf(StaleWriteError)
    // The locked write's backup went beside its primary write, so it reached the backup although it lost.
    expect(await backupBy()).toBe('locked')

    proxy.release()
    await winning
    // Same version, written later: only the winner of the primary may keep its copy there.
    expect(await backupBy()).toBe('other')
  })

  it.each(
    backends,
  )('a backup already newer than the primary the request read is not written beside it (%s)', async (backend) => {
    const { proxy, locked, other, id, backupBy } = await twoInstances(backend, 'locked')
    // The locked instance's read of the backup is stalled; the other instance writes both copies meanwhile.
    proxy.hold()
    const mine = await storeOf(locked).load(id, { readBackup: true })
    const theirs = await storeOf(other).load(id)
    await storeOf(other).save(id, record(2, 'other'), 60, { ifUnchanged: theirs?.cas, backupIfOlder: true })
    proxy.release()

    await expect(
      storeOf(locked).save(id, record(2, 'locked'), 60, { ifUnchanged: mine?.cas }),
    ).rejects.toBeInstanceOf(StaleWriteError)
    expect(await backupBy()).toBe('other')
  })

  it('adds no backup beside the primary where the backup was missing: a destroy in between stays whole', async () => {
    const { locked, other, id, backup, backupBy } = await twoInstances('memcached', 'other')
    await locked.ring.call('n2', (node) => node.delete(backup))
    const mine = await storeOf(locked).load(id, { readBackup: true })
    await storeOf(other).destroy(id)
    await expect(
      storeOf(locked).save(id, record(2, 'locked'), 60, { ifUnchanged: mine?.cas }),
    ).rejects.toBeInstanceOf(StaleWriteError)
    expect(await backupBy()).toBeNull()
  })

  it('reads the backup beside the session only on routes that write, and writes it with one compare-and-set', async () => {
    const servers = await startCluster(2)
    const app = await startShop(express, { secret: SECRET, nodes: nodesFor(servers), lockingMode: 'all' })
    shops.push(app)
    const browser = new Browser()
    await browser.send(app, 'POST', '/cart/start')
    const n2 = servers[1] as (typeof servers)[number]
    const backupOps = async () => {
      const stats = await n2.stats()
      return {
        reads: Number(stats.cmd_get),
        compareAndSets: Number(stats.cas_hits),
        sets: Number(stats.cmd_set),
      }
    }
    const before = await backupOps()
    expect((await browser.send(app, 'POST', '/cart/more')).status).toBe(200)
    // Its backup read, and one write to it: the compare-and-set on that read's token.
    expect(await backupOps()).toEqual({
      reads: before.reads + 1,
      compareAndSets: before.compareAndSets + 1,
      sets: before.sets + 1,
    })
    // A route not known yet reads the backup too; once it is seen to only read, it no longer does.
    await browser.send(app, 'GET', '/cart')
    const learned = await backupOps()
    expect((await browser.send(app, 'GET', '/cart')).body.cart).toEqual(['start', 'more'])
    expect((await backupOps()).reads).toBe(learned.reads)
  })
})

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms))
