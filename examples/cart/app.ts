import express from 'express'
import type { SessionFailoverMiddleware } from '../../src/index.js'

declare module 'express-session' {
  interface SessionData {
    cart: string[]
  }
}

/** A small shop: the cart lives in the session. `instance` names the app instance that answered. */
export function createCartApp(sessions: SessionFailoverMiddleware, instance: string): express.Express {
  const app = express()
  app.disable('x-powered-by')
  app.use(sessions)

  // The session id is not in the body: the body is written before the session is stored, and storing it can
  // move the session to another node, and so change its id (the new id goes out in the cookie).
  const view = (req: express.Request) => ({ instance, cart: req.session.cart ?? [] })

  app.get('/cart', (req, res) => {
    res.json(view(req))
  })
  app.post('/cart/:item', (req, res) => {
    req.session.cart = [...(req.session.cart ?? []), req.params.item]
    res.json(view(req))
  })
  app.get('/healthz', (_req, res) => {
    const health = sessions.health()
    res.status(health.ready ? 200 : 503).json(health)
  })
  // What the demo's live page shows; a real shop would not publish this.
  app.get('/stats', (_req, res) => {
    res.json({ instance, ...sessions.stats(), local: sessions.localStatus() ?? null })
  })
  return app
}
