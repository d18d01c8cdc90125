#!/usr/bin/env python3
"""Single-tier, per-block reimplementation of decayed-hotness eviction (ties evict the deeper
block) against LRU on the Mooncake conversation trace, prefix hits only. Written to check the
design notes' prototype figures (docs/benchmarks.md). Standard library only."""
import json, math, heapq, sys
import os
TRACE = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'traces',
                     'mooncake_fast25_conversation_trace.jsonl')
rs = [json.loads(l) for l in open(TRACE)]
def run(cap, hl, mode):
    key={}  # block -> key
    depth={}
    heap=[]
    hit=tot=0
    for r in rs:
        t=r['timestamp']/1000.0
        ids=r['hash_ids']
        h=0
        for b in ids:
            if b in key: h+=1
            else: break
        tot+=r['input_length']; hit+=min(h*512, r['input_length'])
        for d,b in enumerate(ids):
            if mode=='lru':
                k=t
            else:
                old=key.get(b, -math.inf)
                base=t/hl
                k=base+math.log2(1+2**(old-base)) if old>-math.inf else base
            key[b]=k; depth[b]=d
            heapq.heappush(heap,(k,-d,b))
        while len(key)>cap:
            k,nd,b=heapq.heappop(heap)
            if key.get(b)==k and depth[b]==-nd:
                del key[b]
    return hit/tot
for cap in [1000,4000]:
    print(cap, 'lru',round(run(cap,600,'lru'),3), 'hot600', round(run(cap,600,'hot'),3))
