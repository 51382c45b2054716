import { execFileSync } from 'node:child_process'
import { readFileSync } from 'node:fs'
import type { AddressInfo } from 'node:net'
import Fastify, { type FastifyInstance } from 'fastify'
import type { SessionStats } from '../../src/index.js'
import {
  type MemcachedServer,
  memcachedBinary,
  nodesOption,
  startMemcached,
  stopAllMemcached,
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
    up: boolean
    /** The instance's stats(); null while it is down or does not answer. */
    stats: (SessionStats & { local: unknown }) | null
  }[]
}

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
  readonly mode: SessionMode
  readonly nodes: readonly MemcachedServer[]
  readonly instances: readonly ShopProcess[]
  readonly #nodeStates: NodeState[]
  readonly #balancer: FastifyInstance
  #url = ''

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
    this.#balancer = balancer
  }

  /** Starts everything; if any part fails to start, what did start is stopped. */
  static async start(options: ClusterOptions): Promise<DemoCluster> {
    ensureMemcached()
    const nodes: MemcachedServer[] = []
    const instances: ShopProcess[] = []
    const balancer = Fastify()
    try {
      for (let i = 0; i < (options.nodes ?? 3); i++) nodes.push(await startMemcached())
      const names = ['a', 'b', 'c', 'd', 'e', 'f', 'g', 'h', 'i'].slice(0, options.instances ?? 3)
      for (const name of names) {
        instances.push(
          new ShopProcess({ name, nodes: nodesOption(nodes), sticky: options.mode === 'sticky' }),
        )
      }
      await Promise.all(instances.map((instance) => instance.start()))
      const cluster = new DemoCluster(options.mode, nodes, instances, balancer)
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
      )
      await balancer.listen({ port: options.port ?? 0, host: '127.0.0.1' })
      cluster.#url = `http://127.0.0.1:${(balancer.server.address() as AddressInfo).port}`
      return cluster
    } catch (error) {
      await Promise.all(instances.map((instance) => instance.kill()))
      await stopAllMemcached()
      await balancer.close()
      throw error
    }
  }

  /** The balancer's address: the shop, and the live page at `/`. */
  get url(): string {
    return this.#url
  }

  async nodeAction(index: number, action: (typeof NODE_ACTIONS)[number]): Promise<void> {
    const node = this.nodes[index]
    if (!node) throw new RangeError(`no node ${index + 1}`)
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
        this.instances.map(async (instance) => ({
          name: instance.settings.name,
          port: instance.port,
          up: instance.running,
          stats: instance.running ? await statsOf(instance.url) : null,
        })),
      ),
    }
  }

  /** Stops every process the cluster started, and the balancer. */
  async stop(): Promise<void> {
    await Promise.all(this.instances.map((instance) => instance.kill()))
    await stopAllMemcached()
    await this.#balancer.close()
  }

  #routes(): void {
    const app = this.#balancer
    app.get('/', (_request, reply) => reply.type('text/html; charset=utf-8').send(page))
    app.get('/_cluster/state', () => this.state())
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
