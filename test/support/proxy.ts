import { type AddressInfo, connect, createServer, type Socket } from 'node:net'
import { MemcachedNode } from '../../src/nodes/memcached.js'

/**
 * A loopback TCP proxy in front of one server, which a test can cut (every connection dropped, new ones
 * refused) and restore: one app instance loses its nodes while the others still reach them.
 */
export interface CuttableProxy {
  readonly port: number
  cut(): void
  restore(): void
  close(): Promise<void>
}

export async function startProxy(targetPort: number): Promise<CuttableProxy> {
  const sockets = new Set<Socket>()
  let open = true
  const server = createServer((client) => {
    client.on('error', () => {})
    if (!open) {
      client.destroy()
      return
    }
    const upstream = connect(targetPort, '127.0.0.1')
    upstream.on('error', () => client.destroy())
    client.on('close', () => upstream.destroy())
    upstream.on('close', () => client.destroy())
    sockets.add(client).add(upstream)
    client.pipe(upstream).pipe(client)
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const cut = (): void => {
    open = false
    for (const socket of sockets) socket.destroy()
    sockets.clear()
  }
  return {
    port: (server.address() as AddressInfo).port,
    cut,
    restore() {
      open = true
    },
    close() {
      cut()
      return new Promise((resolve) => server.close(() => resolve()))
    },
  }
}

/** A loopback TCP proxy in front of one server that reports each chunk a client sends and each chunk of reply. */
export interface WatchingProxy {
  readonly port: number
  close(): Promise<void>
}

export async function startWatchingProxy(
  targetPort: number,
  watch: { readonly request?: (chunk: Buffer) => void; readonly reply?: (chunk: Buffer) => void },
): Promise<WatchingProxy> {
  const sockets = new Set<Socket>()
  const server = createServer((client) => {
    const upstream = connect(targetPort, '127.0.0.1')
    sockets.add(client).add(upstream)
    client.on('error', () => {})
    upstream.on('error', () => {})
    client.on('data', (chunk: Buffer) => {
      watch.request?.(chunk)
      upstream.write(chunk)
    })
    upstream.on('data', (chunk: Buffer) => {
      watch.reply?.(chunk)
      client.write(chunk)
    })
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  return {
    port: (server.address() as AddressInfo).port,
    close() {
      for (const socket of sockets) socket.destroy()
      return new Promise((resolve) => server.close(() => resolve()))
    },
  }
}

/**
 * A memcached node of the test's own, reached through a watching proxy that pushes 'node request' onto `events`
 * as each of its requests arrives, with its connection already open: for tests that order what a node is sent
 * against what a client receives.
 */
export async function watchedNode(
  memcachedPort: number,
  events: string[],
): Promise<{ readonly node: MemcachedNode; close(): Promise<void> }> {
  const proxy = await startWatchingProxy(memcachedPort, { request: () => events.push('node request') })
  const node = new MemcachedNode({
    id: 'watched',
    host: '127.0.0.1',
    port: proxy.port,
    operationTimeoutMs: 2000,
    probeKey: 'probe',
  })
  const close = async (): Promise<void> => {
    await node.close()
    await proxy.close()
  }
  try {
    await node.set('warm', Buffer.from('1'), 60)
  } catch (error) {
    await close()
    throw error
  }
  return { node, close }
}

/** memcached binary-protocol opcodes the tests look for, by name. */
const OPCODES: Readonly<Record<number, string>> = { 0: 'get', 2: 'add', 4: 'delete' }

/**
 * A watching proxy that pushes onto `events` the name of each memcached request as it arrives ('get', 'add',
 * 'delete', else 'other') and 'reply' for each chunk of reply: for tests that order what a node is sent.
 */
export function startOpcodeProxy(memcachedPort: number, events: string[]): Promise<WatchingProxy> {
  return startWatchingProxy(memcachedPort, {
    request(chunk) {
      for (let at = 0; at + 24 <= chunk.length; at += 24 + chunk.readUInt32BE(at + 8)) {
        events.push(OPCODES[chunk[at + 1] as number] ?? 'other')
      }
    },
    reply: () => events.push('reply'),
  })
}
