// npm run demo: three real memcached nodes, two app instances, one shopper, and a node killed mid-visit.
import { execFileSync } from 'node:child_process'
import type { Server } from 'node:http'
import type { AddressInfo } from 'node:net'
import { parseSessionId, type SessionFailoverMiddleware, sessionFailover } from '../src/index.js'
import { memcachedBinary, nodesOption, startCluster, stopAllMemcached } from '../test/support/memcached.js'
import { createCartApp } from './cart/app.js'

interface Instance {
  readonly name: string
  readonly url: string
  readonly server: Server
  readonly sessions: SessionFailoverMiddleware
}

function ensureMemcached(): void {
  if (memcachedBinary()) return
  if (process.getuid?.() !== 0) {
    console.error(
      'memcached is not installed: run `sudo apt-get install -y memcached`, then `npm run demo` again',
    )
    process.exit(1)
  }
  console.log('installing memcached (Debian package)...')
  execFileSync(
    'sh',
    ['-c', 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq memcached'],
    {
      stdio: 'inherit',
    },
  )
}

async function startInstance(name: string, nodes: string): Promise<Instance> {
  const sessions = sessionFailover({
    secret: 'demo-secret',
    nodes,
    operationTimeout: 300,
    nodeProbeInterval: 500,
  })
  const server = await new Promise<Server>((resolve) => {
    const listening = createCartApp(sessions, name).listen(0, '127.0.0.1', () => resolve(listening))
  })
  const { port } = server.address() as AddressInfo
  return { name, url: `http://127.0.0.1:${port}`, server, sessions }
}

let cookie = ''
async function shop(instance: Instance, method: 'GET' | 'POST', path: string) {
  const response = await fetch(instance.url + path, { method, headers: cookie ? { cookie } : {} })
  const set = response.headers.getSetCookie()[0]
  if (set) cookie = set.split(';')[0] as string
  const body = (await response.json()) as { node: string; cart: string[]; sessionId: string }
  const note = set ? '  (cookie set)' : ''
  console.log(
    `  ${instance.name}  ${method.padEnd(4)} ${path.padEnd(12)} -> ${response.status}  cart=[${body.cart.join(', ')}]  primary on ${body.node}${note}`,
  )
  return { status: response.status, ...body }
}

async function main(): Promise<boolean> {
  ensureMemcached()
  const servers = await startCluster(3)
  const nodes = nodesOption(servers)
  console.log('session-failover demo: every session is kept on two memcached nodes\n')
  for (const [i, s] of servers.entries()) {
    console.log(`  node n${i + 1}: memcached on 127.0.0.1:${s.port} (pid ${s.pid})`)
  }
  const instances = [await startInstance('app A', nodes), await startInstance('app B', nodes)]
  const [a, b] = instances as [Instance, Instance]
  console.log(`  two app instances share them: ${a.url} and ${b.url}\n`)

  try {
    console.log('A shopper fills a cart, alternating between the instances:')
    await shop(a, 'POST', '/cart/apple')
    const before = await shop(b, 'POST', '/cart/pear')
    const primary = parseSessionId(before.sessionId)?.nodeId as string
    const index = Number(primary.slice(1)) - 1
    const backup = `n${((index + 1) % 3) + 1}`
    console.log(`\nThe cart's primary copy is on ${primary}, its backup on ${backup}.`)
    console.log(`Killing ${primary} with SIGKILL (memcached pid ${servers[index]?.pid})...\n`)
    await servers[index]?.kill()

    console.log('The shopper carries on:')
    const after = await shop(a, 'POST', '/cart/plum')
    const last = await shop(b, 'GET', '/cart')
    const survived = last.cart.join() === 'apple,pear,plum' && after.node !== primary
    console.log(
      survived
        ? `\nThe cart survived: read from the backup, moved to ${after.node} (new primary + backup), and the ` +
            `cookie was reissued with the new node id.\n`
        : `\nUNEXPECTED: cart is [${last.cart.join(', ')}] on ${last.node}\n`,
    )
    return survived
  } finally {
    for (const instance of instances) {
      instance.server.closeAllConnections()
      instance.server.close()
      await instance.sessions.close()
    }
    await stopAllMemcached()
  }
}

main().then(
  (ok) => process.exit(ok ? 0 : 1),
  (error: unknown) => {
    console.error(error)
    void stopAllMemcached().finally(() => process.exit(1))
  },
)
