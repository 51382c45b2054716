// Run one instance of the shop against your own memcached nodes:
//   MEMCACHED_NODES='n1:127.0.0.1:11211 n2:127.0.0.1:11212' PORT=3000 npx tsx examples/cart/server.ts
import { sessionFailover } from '../../src/index.js'
import { createCartApp } from './app.js'

const sessions = sessionFailover({
  secret: process.env.SESSION_SECRET ?? 'change-me',
  nodes: process.env.MEMCACHED_NODES,
  cookie: { maxAge: 30 * 60 * 1000 },
})
const port = Number(process.env.PORT ?? 3000)
const server = createCartApp(sessions, `port ${port}`).listen(port, () => {
  console.log(`shop on http://localhost:${port}/cart`)
})

// Stop taking requests, let the ones in flight finish (their sessions are stored before they answer), then close.
process.once('SIGTERM', () => {
  server.close(() => {
    void sessions.close().then(() => process.exit(0))
  })
})
