// connect-memcached ships no types; only what bench/app.ts uses.
declare module 'connect-memcached' {
  import type session from 'express-session'
  function connectMemcached(
    expressSession: typeof session,
  ): new (options: {
    hosts: string[]
  }) => session.Store
  export default connectMemcached
}
