// Run one instance of the shop against your own memcached nodes:
//   MEMCACHED_NODES='n1:127.0.0.1:11211 n2:127.0.0.1:11212' PORT=3000 npx tsx examples/cart/server.ts
// Optional: INSTANCE (its name in responses), STICKY=1 with ROUTE (sticky mode, this instance's route),
// EXIT_WITH_PARENT=1 (exit when stdin closes).
// Prints `LISTENING <port>` once it accepts requests (PORT=0 picks a free port).
import type { AddressInfo } from 'node:net'
import { sessionFailover } from '../../src/index.js'
import { createCartApp } from './app.js'

const sticky = process.env.STICKY === '1'
const sessions = sessionFailover({
  secret: process.env.SESSION_SECRET ?? 'change-me',
  nodes: process.env.MEMCACHED_NODES,
  cookie: { maxAge: 30 * 60 * 1000 },
  // Quick failure detection, for a demo on one machine.
  operationTimeout: 300,
  nodeProbeInterval: 500,
  ...(sticky ? { sticky: true, route: process.env.ROUTE } : {}),
})
const port = Number(process.env.PORT ?? 3000)
const name = process.env.INSTANCE ?? `port ${port}`
const server = createCartApp(sessions, name).listen(port, '127.0.0.1', () => {
  const { port: listening } = server.address() as AddressInfo
  console.log(`LISTENING ${listening}`)
  console.log(`shop ${name} on http://127.0.0.1:${listening}/cart`)
})

// Started by the demo cluster: gone with it, even when it is killed (its end of stdin closes).
if (process.env.EXIT_WITH_PARENT === '1') {
  process.stdin.on('end', () => process.exit(0))
  process.stdin.resume()
}

// Stop taking requests, let the ones in flight finish (their sessions are stored before they answer), then close.
process.once('SIGTERM', () => {
  server.close(() => {
    void sessions.close().then(() => process.exit(0))
  })
})
