// One app instance as its own process, so tests can SIGKILL or SIGTERM it. Options come as JSON in SF_OPTIONS;
// the port it listens on is printed as `LISTENING <port>`.
import express from 'express'
import type { SessionFailoverOptions } from '../../src/index.js'
import { startShop } from './app.js'

const options = JSON.parse(process.env.SF_OPTIONS ?? '{}') as SessionFailoverOptions
const shop = await startShop(express, options)
process.stdout.write(`LISTENING ${new URL(shop.url).port}\n`)

if (process.env.SF_OWN_SIGTERM) {
  // An application's own graceful shutdown: stop accepting, let requests in flight finish, close, exit 0.
  process.once('SIGTERM', () => {
    shop.server.close(() => {
      void shop.sessions.close().then(() => process.exit(0))
    })
  })
}
