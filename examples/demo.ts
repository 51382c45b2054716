// npm run demo: three memcached nodes, three shop instances and a load balancer, with a live page to kill and
// revive them. `npm run demo -- --sticky` runs sticky mode (the balancer pins each client to an instance);
// `--port=8080` picks the balancer's port.
import { DemoCluster } from './cluster/cluster.js'

const mode = process.argv.includes('--sticky') ? 'sticky' : 'non-sticky'
const portArgument = process.argv.find((argument) => argument.startsWith('--port='))
// A free port unless one is asked for: the URL is printed.
const port = portArgument ? Number(portArgument.slice('--port='.length)) : 0

// Installed first: a signal during start-up must stop what did start.
let stopping = false
for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
  process.on(signal, () => {
    if (stopping) return
    stopping = true
    console.log(`\n${signal}: stopping every process the demo started...`)
    void DemoCluster.stopAll().then(
      () => process.exit(0),
      (error: unknown) => {
        console.error(error)
        process.exit(1)
      },
    )
  })
}

console.log(`starting the demo cluster (${mode}): 3 memcached nodes, 3 shop instances, a load balancer...`)
let cluster: DemoCluster
try {
  cluster = await DemoCluster.start({ mode, port })
} catch (error) {
  console.error(error instanceof Error ? error.message : error)
  process.exit(1)
}
const state = await cluster.state()
for (const node of state.nodes)
  console.log(`  memcached ${node.id} on 127.0.0.1:${node.port} (pid ${node.pid})`)
for (const instance of cluster.instances) {
  console.log(`  shop instance ${instance.settings.name} on ${instance.url} (pid ${instance.pid})`)
}
console.log(`\nOpen ${cluster.url}/ : add items, kill the node that holds your cart, add another.`)
console.log('Ctrl-C stops everything.\n')
