import { type ChildProcess, spawn } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import { announcedPort } from '../../test/support/process.js'

const server = fileURLToPath(new URL('../cart/server.ts', import.meta.url))

export interface ShopSettings {
  readonly name: string
  /** The `nodes` option: 'n1:127.0.0.1:port ...'. */
  readonly nodes: string
  /** Sticky mode, with `name` as the instance's route. */
  readonly sticky: boolean
}

/**
 * One instance of examples/cart as a child process, which the cluster kills (SIGKILL, as a crash) and revives on
 * the same port, so the balancer's address for it stays valid.
 */
export class ShopProcess {
  readonly settings: ShopSettings
  #child: ChildProcess | undefined
  #port = 0

  constructor(settings: ShopSettings) {
    this.settings = settings
  }

  get port(): number {
    return this.#port
  }

  get url(): string {
    return `http://127.0.0.1:${this.#port}`
  }

  get running(): boolean {
    return this.#child !== undefined
  }

  get pid(): number | undefined {
    return this.#child?.pid
  }

  /** Starts the instance (on its old port when it ran before) and resolves once it listens. */
  async start(): Promise<void> {
    if (this.#child) return
    const child = spawn(process.execPath, ['--import', 'tsx', server], {
      env: {
        ...process.env,
        PORT: String(this.#port),
        INSTANCE: this.settings.name,
        MEMCACHED_NODES: this.settings.nodes,
        SESSION_SECRET: 'session-failover demo secret',
        EXIT_WITH_PARENT: '1',
        ...(this.settings.sticky ? { STICKY: '1', ROUTE: this.settings.name } : {}),
      },
      // stdin stays open while this process lives: the instance exits when it closes.
      stdio: ['pipe', 'pipe', 'inherit'],
    })
    this.#child = child
    child.once('exit', () => {
      if (this.#child === child) this.#child = undefined
    })
    this.#port = await announcedPort(child, `instance ${this.settings.name}`, 20_000)
  }

  /** SIGKILL: a crash, with no chance to finish anything. Resolves once the process is gone. */
  async kill(): Promise<void> {
    const child = this.#child
    if (!child) return
    this.#child = undefined
    if (child.exitCode !== null || child.signalCode !== null) return
    const exited = new Promise((resolve) => child.once('exit', resolve))
    child.kill('SIGKILL')
    await exited
  }
}
