import { execFileSync } from 'node:child_process'
import { readFileSync } from 'node:fs'
import type { AddressInfo } from 'node:net'
import Fastify, { type FastifyInstance } from 'fastify'
import { storageKeys } from '../../src/core/keys.js'
import { parseSessionId, type SessionStats } from '../../src/index.js'
import {
  type MemcachedServer,
  memcachedBinary,
  nodesOption,
  startMemcached,
} from '../../test/support/memcached.js'
import { addBalancer } from './balancer.js'
import { ShopProcess } from './shop-process.js'

/** Non-sticky: every request may reach any instance (round-robin). Sticky: a client stays on its instance. */
export type SessionMode = 'sticky' | 'non-sticky'

export interface ClusterOptions {
  readonly mode: SessionMode
  /** memcached nodes (default 3). */
  readonly nodes?: number
  /** Shop instances (default 3). */
  readonly instances?: number
  /** The balancer's port (default: a free one). */
  readonly port?: number
}

export type NodeState = 'up' | 'killed' | 'frozen'

export interface ClusterState {
  readonly mode: SessionMode
  readonly nodes: readonly { id: string; port: number; pid: number; state: NodeState }[]
  readonly instances: readonly {
    name: string
    port: number
    /** Of the running process: stats of a killed and revived instance start again from zero. */
    pid: number | undefined
    up: boolean
    /** The instance's stats(); null while it is down or does not answer. */
    stats: (SessionStats & { local: unknown }) | null
  }[]
}

/** Where a session's copies are, as the nodes themselves answer (a frozen or killed node cannot say). */
export interface SessionLocation {
  /** The node the session id names: where its primary copy belongs. */
  readonly named: string | undefined
  readonly nodes: readonly { id: string; state: NodeState; primary: boolean | null; backup: boolean | null }[]
}

/** The session cookie of examples/cart (express-session's default name). */
const SESSION_COOKIE = 'connect.sid'
/** The library's default key prefix, which examples/cart keeps. */
const KEY_PREFIX = 'sf:'
/**
 * Control requests must carry this header: a page on another site cannot add it without a CORS preflight, so it
 * cannot kill the demo's processes from a visitor's browser.
 */
export const CONTROL_HEADER = 'x-demo-control'
const NODE_ACTIONS = ['kill', 'revive', 'freeze', 'thaw'] as const
const INSTANCE_ACTIONS = ['kill', 'revive'] as const
const page = readFileSync(new URL('./page.html', import.meta.url), 'utf8')

/** Installs Debian's memcached when it is missing and we may (root); otherwise one clear instruction. */
export function ensureMemcached(): void {
  if (memcachedBinary()) return
  if (process.getuid?.() !== 0) {
    throw new Error('memcached is not installed: run `sudo apt-get install -y memcached`, then try again')
  }
  console.log('installing memcached (Debian package)...')
  execFileSync(
    'sh',
    ['-c', 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq memcached'],
    { stdio: 'inherit' },
  )
}

/**
 * The demo cluster: memcached nodes and shop instances as real processes, a load balancer in front, and on the
 * balancer's own routes the live page and the controls that kill, freeze and revive them.
 */
export class DemoCluster {
  /** Every cluster started and not yet stopped, so a signal handler can stop them all. */
  static readonly #running = new Set<DemoCluster>()
  /** Clusters still starting: how to stop what has started so far. */
  static readonly #starting = new Set<() => Promise<void>>()
  readonly mode: SessionMode
  readonly nodes: readonly MemcachedServer[]
  readonly instances: readonly ShopProcess[]
  readonly #nodeStates: NodeState[]
  /** Actions on one node run one after the other (a kill during a restart must not miss the new process). */
  readonly #nodeActions: Promise<void>[]
  readonly #balancer: FastifyInstance
  #url = ''
  #stopped: Promise<void> | undefined

  private constructor(
    mode: SessionMode,
    nodes: readonly MemcachedServer[],
    instances: readonly ShopProcess[],
    balancer: FastifyInstance,
  ) {
    this.mode = mode
    this.nodes = nodes
    this.instances = instances
    this.#nodeStates = nodes.map(() => 'up')
    this.#nodeActions = nodes.map(() => Promise.resolve())
    this.#balancer = balancer
  }

  /** Stops every cluster of this process (Ctrl-C, SIGTERM). */
  static async stopAll(): Promise<void> {
    await Promise.all([
      ...[...DemoCluster.#running].map((cluster) => cluster.stop()),
      ...[...DemoCluster.#starting].map((stop) => stop()),
    ])
  }

  /** Starts everything; if any part fails to start, what did start is stopped. */
  static async start(options: ClusterOptions): Promise<DemoCluster> {
    ensureMemcached()
    const nodes: MemcachedServer[] = []
    const instances: ShopProcess[] = []
    const balancer = Fastify()
    const stopStarted = async (): Promise<void> => {
      await Promise.all(instances.map((instance) => instance.kill()))
      await Promise.all(nodes.map((node) => node.kill()))
      await balancer.close()
    }
    DemoCluster.#starting.add(stopStarted)
    let cluster: DemoCluster | undefined
    try {
      for (let i = 0; i < (options.nodes ?? 3); i++) nodes.push(await startMemcached())
      const names = ['a', 'b', 'c', 'd', 'e', 'f', 'g', 'h', 'i'].slice(0, options.instances ?? 3)
      for (const name of names) {
        instances.push(
          new ShopProcess({ name, nodes: nodesOption(nodes), sticky: options.mode === 'sticky' }),
        )
      }
      await Promise.all(instances.map((instance) => instance.start()))
      cluster = new DemoCluster(options.mode, nodes, instances, balancer)
      DemoCluster.#running.add(cluster)
      cluster.#routes()
      await addBalancer(
        balancer,
        instances.map((instance) => ({
          name: instance.settings.name,
          get url() {
            return instance.url
          },
        })),
        options.mode === 'sticky' ? 'cookie' : 'round-robin',
        SESSION_COOKIE,
      )
      await balancer.listen({ port: options.port ?? 0, host: '127.0.0.1' })
      cluster.#url = `http://127.0.0.1:${(balancer.server.address() as AddressInfo).port}`
      return cluster
    } catch (error) {
      if (cluster) DemoCluster.#running.delete(cluster)
      await stopStarted()
      throw error
    } finally {
      DemoCluster.#starting.delete(stopStarted)
    }
  }

  /** The balancer's address: the shop, and the live page at `/`. */
  get url(): string {
    return this.#url
  }

  nodeAction(index: number, action: (typeof NODE_ACTIONS)[number]): Promise<void> {
    const node = this.nodes[index]
    if (!node) return Promise.reject(new RangeError(`no node ${index + 1}`))
    const next = (this.#nodeActions[index] ?? Promise.resolve()).then(() =>
      this.#nodeAction(index, node, action),
    )
    this.#nodeActions[index] = next.catch(() => {})
    return next
  }

  async #nodeAction(
    index: number,
    node: MemcachedServer,
    action: (typeof NODE_ACTIONS)[number],
  ): Promise<void> {
    if (this.#stopped) return
    const state = this.#nodeStates[index]
    if (action === 'kill' && state !== 'killed') {
      if (state === 'frozen') node.thaw()
      await node.kill()
      this.#nodeStates[index] = 'killed'
    } else if (action === 'revive' && state !== 'up') {
      // A crashed memcached comes back empty: restart() starts a new process on the same port.
      if (state === 'frozen') node.thaw()
      else await node.restart()
      this.#nodeStates[index] = 'up'
    } else if (action === 'freeze' && state === 'up') {
      await node.freeze()
      this.#nodeStates[index] = 'frozen'
    } else if (action === 'thaw' && state === 'frozen') {
      node.thaw()
      this.#nodeStates[index] = 'up'
    }
  }

  async instanceAction(index: number, action: (typeof INSTANCE_ACTIONS)[number]): Promise<void> {
    const instance = this.instances[index]
    if (!instance) throw new RangeError(`no instance ${index + 1}`)
    if (action === 'kill') await instance.kill()
    else await instance.start()
  }

  async state(): Promise<ClusterState> {
    return {
      mode: this.mode,
      nodes: this.nodes.map((node, index) => ({
        id: `n${index + 1}`,
        port: node.port,
        pid: node.pid,
        state: this.#nodeStates[index] ?? 'up',
      })),
      instances: await Promise.all(
        this.instances.map(async (instance) => {
          const pid = instance.pid
          const stats = instance.running ? await statsOf(instance.url) : null
          // Stats that answered from a process that was replaced meanwhile are not this pid's.
          return {
            name: instance.settings.name,
            port: instance.port,
            pid,
            up: instance.running,
            stats: instance.pid === pid ? stats : null,
          }
        }),
      ),
    }
  }

  /** Asks every node that is up whether it holds the session's primary and backup copies. */
  async locate(sessionId: string): Promise<SessionLocation> {
    const parsed = parseSessionId(sessionId)
    const keys = parsed && storageKeys(KEY_PREFIX, parsed.random)
    return {
      named: parsed?.nodeId,
      nodes: await Promise.all(
        this.nodes.map(async (node, index) => {
          const state = this.#nodeStates[index] ?? 'up'
          const ask = async (key: string | undefined) =>
            key && state === 'up' ? node.has(key).catch(() => null) : null
          return {
            id: `n${index + 1}`,
            state,
            primary: await ask(keys?.primary),
            backup: await ask(keys?.backup),
          }
        }),
      ),
    }
  }

  /** Stops every process the cluster started (waiting for node actions under way), and the balancer. */
  stop(): Promise<void> {
    this.#stopped ??= (async () => {
      DemoCluster.#running.delete(this)
      await Promise.all(this.#nodeActions)
      await Promise.all(this.instances.map((instance) => instance.kill()))
      // A stopped process keeps a SIGKILL pending until it runs again.
      for (const [index, node] of this.nodes.entries()) if (this.#nodeStates[index] === 'frozen') node.thaw()
      await Promise.all(this.nodes.map((node) => node.kill()))
      await this.#balancer.close()
    })()
    return this.#stopped
  }

  #routes(): void {
    const app = this.#balancer
    // The page's controls only: see CONTROL_HEADER.
    app.addHook('onRequest', async (request, reply) => {
      if (
        request.method === 'POST' &&
        request.url.startsWith('/_cluster/') &&
        !request.headers[CONTROL_HEADER]
      ) {
        return reply.code(403).send({ error: `control requests need the ${CONTROL_HEADER} header` })
      }
    })
    app.get('/', (_request, reply) => reply.type('text/html; charset=utf-8').send(page))
    app.get('/favicon.ico', (_request, reply) => reply.code(204).send())
    app.get('/_cluster/state', () => this.state())
    app.get<{ Querystring: { id?: string } }>('/_cluster/locate', async (request, reply) => {
      if (!request.query.id) return reply.code(400).send({ error: 'id is required' })
      return this.locate(request.query.id)
    })
    app.post<{ Params: { index: string; action: string } }>(
      '/_cluster/nodes/:index/:action',
      async (request, reply) => {
        const action = NODE_ACTIONS.find((name) => name === request.params.action)
        const index = Number(request.params.index) - 1
        if (!action || !this.nodes[index]) return reply.code(404).send({ error: 'no such node or action' })
        await this.nodeAction(index, action)
        return this.state()
      },
    )
    app.post<{ Params: { index: string; action: string } }>(
      '/_cluster/instances/:index/:action',
      async (request, reply) => {
        const action = INSTANCE_ACTIONS.find((name) => name === request.params.action)
        const index = Number(request.params.index) - 1
        if (!action || !this.instances[index])
          return reply.code(404).send({ error: 'no such instance or action' })
        await this.instanceAction(index, action)
        return this.state()
      },
    )
  }
}

async function statsOf(url: string): Promise<(SessionStats & { local: unknown }) | null> {
  try {
    const response = await fetch(`${url}/stats`, { signal: AbortSignal.timeout(1000) })
    return response.ok ? ((await response.json()) as SessionStats & { local: unknown }) : null
  } catch {
    return null
  }
}
