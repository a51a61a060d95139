#!/usr/bin/env node
// A js-libp2p peer that tests/integration/test_interop_js.py drives, to check that peerd
// interoperates with a second libp2p implementation (Noise, yamux, identify, ping,
// gossipsub with strict signing, Kademlia; protocol/SPEC.md §2.1) and survives hostile
// peers: clients that look peers up and leave, and peers that open streams and stall them.
//
// Usage: node peer.mjs '<config JSON>'   then one JSON command per line on stdin.
//
// Config (every key optional):
//   listen      true: listen on 127.0.0.1 (an ephemeral port) so others can dial us back
//   services    subset of ["identify", "ping", "dht", "gossipsub"] (default: all four).
//               An attacker that only opens raw streams leaves out "dht" and "gossipsub":
//               js-libp2p caps outbound streams of a protocol it serves itself.
//   max_seconds the process exits by itself after this long (default 120, at most 900)
//   dht_server  true: serve the DHT (default: client mode, as the reported js client)
//
// Commands ({"cmd": ..., "id": <anything>, ...}; every command is answered by exactly one
// {"event": "done", "id", "cmd", ...} or {"event": "error", "id", "cmd", "error"} line):
//   dial      {addr}                      127.0.0.1 multiaddrs with /p2p/<id> only
//   identify  {peer}                      run identify on our connection to peer
//   ping      {peer}
//   lookup    {key?, timeout_s?}          Kademlia getClosestPeers; key is a
//                                         peer ID (default: our own)
//   subscribe {topic}
//   publish   {topic, data}               data is UTF-8 text
//   stall     {peer, protocol, count}     open count streams, never write to them
//   streams   {}                          what happened to the stalled streams so far
//   peers     {}
//   hangup    {peer}
//   exit      {}
// Unprompted lines: {"event": "ready", "peer_id", "addrs"} once started,
// {"event": "message", "topic", "from", "type", "data"} per gossip message received,
// {"event": "exit", "reason"} last.
//
// Every loop is bounded (count, timeout), and the process ends on "exit", on stdin EOF
// (the test died) or after max_seconds, whichever comes first.

import './polyfill.mjs' // first: it must run before any libp2p module does
import { createInterface } from 'node:readline'
import { gossipsub } from '@chainsafe/libp2p-gossipsub'
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { identify } from '@libp2p/identify'
import { kadDHT, passthroughMapper } from '@libp2p/kad-dht'
import { peerIdFromString } from '@libp2p/peer-id'
import { ping } from '@libp2p/ping'
import { tcp } from '@libp2p/tcp'
import { multiaddr } from '@multiformats/multiaddr'
import { createLibp2p } from 'libp2p'

const MAX_STALLED = 4000
const STREAM_OPEN_TIMEOUT_MS = 10_000
const COMMAND_TIMEOUT_MS = 30_000

function emit (obj) {
  process.stdout.write(JSON.stringify(obj) + '\n')
}

const config = JSON.parse(process.argv[2] ?? '{}')
const wanted = new Set(config.services ?? ['identify', 'ping', 'dht', 'gossipsub'])
const maxSeconds = Math.min(Math.max(Number(config.max_seconds ?? 120), 1), 900)

const services = {}
if (wanted.has('identify') || wanted.has('dht') || wanted.has('gossipsub')) {
  // kad-dht and gossipsub learn which peers speak their protocol through identify.
  services.identify = identify()
}
if (wanted.has('ping')) services.ping = ping()
if (wanted.has('dht')) {
  services.dht = kadDHT({
    protocol: '/ipfs/kad/1.0.0',
    // A client, as the reported one: it queries and never serves. dht_server: true makes
    // it a server that other nodes may hand out (and that later vanishes).
    clientMode: config.dht_server !== true,
    peerInfoMapper: passthroughMapper // keep 127.0.0.1 addresses (the default drops them)
  })
}
if (wanted.has('gossipsub')) {
  services.pubsub = gossipsub({
    globalSignaturePolicy: 'StrictSign', // peerd requires signed messages (protocol/SPEC.md §2.1)
    allowPublishToZeroTopicPeers: false, // an unheard publish is an error, not a silent drop
    emitSelf: false
  })
}

const node = await createLibp2p({
  addresses: { listen: config.listen ? ['/ip4/127.0.0.1/tcp/0'] : [] },
  transports: [tcp()],
  connectionEncrypters: [noise()],
  streamMuxers: [yamux()],
  // Only what the test asks for: no bootstrap list, no mDNS, no autodial of strangers.
  connectionManager: { maxConnections: 64 },
  services
})

let exiting = false
async function shutdown (reason, code = 0) {
  if (exiting) return
  exiting = true
  const hard = setTimeout(() => process.exit(code), 5000)
  hard.unref()
  try {
    await node.stop()
  } catch (err) {
    emit({ event: 'log', msg: `stop failed: ${err}` })
  }
  emit({ event: 'exit', reason })
  process.exit(code)
}

setTimeout(() => { shutdown('max_seconds', 3) }, maxSeconds * 1000).unref()
process.on('SIGTERM', () => { shutdown('sigterm') })
// A hostile-peer test must not end because the remote misbehaved: report and carry on.
process.on('unhandledRejection', (err) => { emit({ event: 'log', msg: `unhandled rejection: ${err}` }) })
process.on('uncaughtException', (err) => { emit({ event: 'log', msg: `uncaught exception: ${err}` }) })

const decoder = new TextDecoder()
if (services.pubsub != null) {
  node.services.pubsub.addEventListener('message', (evt) => {
    const msg = evt.detail
    emit({
      event: 'message',
      topic: msg.topic,
      type: msg.type, // 'signed' under StrictSign
      from: msg.type === 'signed' ? msg.from.toString() : null,
      data: decoder.decode(msg.data)
    })
  })
}

function parsePeer (text) {
  return peerIdFromString(String(text))
}

function connectionTo (peer) {
  const conns = node.getConnections(peer)
  if (conns.length === 0) throw new Error(`not connected to ${peer}`)
  return conns[0]
}

// --- stalled streams ---------------------------------------------------------------------

const stalled = [] // { protocol, peer, state: 'open' | 'remote_closed' | 'reset' }

function watch (stream, record) {
  // Reading does not unstall the remote: it waits for bytes from us, which never come.
  // Draining only lets us see when the remote closes (FIN) or resets (RST) the stream.
  (async () => {
    try {
      for await (const _ of stream.source) { /* discard */ }
      record.state = 'remote_closed'
    } catch {
      record.state = 'reset'
    }
  })()
}

async function stall (peer, protocol, count) {
  count = Math.min(Math.max(Number(count), 0), MAX_STALLED - stalled.length)
  let opened = 0
  const errors = {}
  for (let i = 0; i < count; i++) {
    try {
      const conn = connectionTo(peer)
      const stream = await conn.newStream([protocol], {
        signal: AbortSignal.timeout(STREAM_OPEN_TIMEOUT_MS),
        maxOutboundStreams: MAX_STALLED + 16
      })
      const record = { protocol, peer: peer.toString(), state: 'open' }
      stalled.push(record)
      watch(stream, record)
      opened++
    } catch (err) {
      const key = err?.name ?? 'Error'
      errors[key] = (errors[key] ?? 0) + 1
      if (node.getConnections(peer).length === 0) break // the remote hung up on us
    }
  }
  return { opened, failed: count - opened, errors }
}

function streamReport () {
  const byProtocol = {}
  for (const r of stalled) {
    const p = (byProtocol[r.protocol] ??= { open: 0, remote_closed: 0, reset: 0 })
    p[r.state]++
  }
  const connections = node.getConnections().map((c) => ({
    peer: c.remotePeer.toString(),
    streams: c.streams.length,
    status: c.status
  }))
  return { stalled: byProtocol, connections }
}

// --- commands ----------------------------------------------------------------------------

async function lookup (keyText, timeoutS) {
  const dht = node.services.dht
  if (dht == null) throw new Error('started without the dht service')
  const key = keyText == null ? node.peerId : parsePeer(keyText)
  const signal = AbortSignal.timeout(Math.min(Number(timeoutS ?? 20), 60) * 1000)
  // The routing table fills once identify told us which peers serve the DHT.
  for (let i = 0; i < 200 && dht.routingTable.size === 0 && !signal.aborted; i++) {
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
  const found = new Set()
  const responded = new Set()
  const errors = []
  for await (const ev of dht.getClosestPeers(key.toMultihash().bytes, { signal })) {
    if (ev.name === 'FINAL_PEER') found.add(ev.peer.id.toString())
    else if (ev.name === 'PEER_RESPONSE') {
      responded.add(ev.from.toString())
      for (const p of ev.closer) found.add(p.id.toString())
    } else if (ev.name === 'QUERY_ERROR' && errors.length < 16) {
      errors.push(`${ev.from}: ${ev.error?.name}: ${ev.error?.message}`)
    }
  }
  found.delete(node.peerId.toString())
  return { peers: [...found].sort(), responded: [...responded].sort(), query_errors: errors }
}

async function run (cmd) {
  const signal = AbortSignal.timeout(COMMAND_TIMEOUT_MS)
  switch (cmd.cmd) {
    case 'dial': {
      const ma = multiaddr(String(cmd.addr))
      // The harness only ever talks to peers on this machine.
      if (!String(cmd.addr).startsWith('/ip4/127.0.0.1/')) throw new Error('only 127.0.0.1 is dialled')
      const conn = await node.dial(ma, { signal })
      return { peer: conn.remotePeer.toString(), encryption: conn.encryption, multiplexer: conn.multiplexer }
    }
    case 'identify': {
      const result = await node.services.identify.identify(connectionTo(parsePeer(cmd.peer)), { signal })
      return {
        peer: result.peerId.toString(),
        agent: result.agentVersion ?? null,
        protocol_version: result.protocolVersion ?? null,
        protocols: [...result.protocols].sort(),
        listen_addrs: result.listenAddrs.map((a) => a.toString()),
        has_public_key: result.publicKey != null
      }
    }
    case 'ping': {
      const rtt = await node.services.ping.ping(parsePeer(cmd.peer), { signal })
      return { rtt_ms: rtt }
    }
    case 'lookup':
      return await lookup(cmd.key, cmd.timeout_s)
    case 'subscribe':
      node.services.pubsub.subscribe(String(cmd.topic))
      return {}
    case 'publish': {
      const result = await node.services.pubsub.publish(String(cmd.topic), new TextEncoder().encode(String(cmd.data)))
      return { recipients: result.recipients.map((p) => p.toString()) }
    }
    case 'mesh':
      return { peers: node.services.pubsub.getSubscribers(String(cmd.topic)).map((p) => p.toString()) }
    case 'stall':
      return await stall(parsePeer(cmd.peer), String(cmd.protocol), cmd.count)
    case 'streams':
      return streamReport()
    case 'peers':
      return { peers: node.getPeers().map((p) => p.toString()).sort() }
    case 'hangup':
      await node.hangUp(parsePeer(cmd.peer), { signal })
      return {}
    case 'exit':
      emit({ event: 'done', id: cmd.id ?? null, cmd: 'exit' })
      await shutdown('exit')
      return {}
    default:
      throw new Error(`unknown command ${JSON.stringify(cmd.cmd)}`)
  }
}

emit({ event: 'ready', peer_id: node.peerId.toString(), addrs: node.getMultiaddrs().map((a) => a.toString()) })

const lines = createInterface({ input: process.stdin })
lines.on('line', (line) => {
  if (line.trim() === '') return
  let cmd
  try {
    cmd = JSON.parse(line)
  } catch (err) {
    emit({ event: 'error', id: null, cmd: null, error: `not JSON: ${err}` })
    return
  }
  // Commands run concurrently; the test pairs answers with requests by id.
  run(cmd).then(
    (result) => { if (cmd.cmd !== 'exit') emit({ event: 'done', id: cmd.id ?? null, cmd: cmd.cmd, ...result }) },
    (err) => { emit({ event: 'error', id: cmd.id ?? null, cmd: cmd.cmd, error: `${err?.name ?? 'Error'}: ${err?.message ?? err}` }) }
  )
})
lines.on('close', () => { shutdown('stdin closed') })
