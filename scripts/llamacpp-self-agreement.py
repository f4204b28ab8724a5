#!/usr/bin/env python3
"""How often llama.cpp agrees with its own reference run (shared/fixtures/llamacpp)
when run with other attention numerics: teacher-forced on the reference
continuation, one /completion request per position, top-1 compared.

Usage: scripts/llamacpp-self-agreement.py MODEL REFERENCE.json [llama-server args...]
e.g.   scripts/llamacpp-self-agreement.py models/SmolLM2-135M-Instruct.Q4_1.gguf \
           ../shared/fixtures/llamacpp/smollm2.json -fa off -ctk f32 -ctv f32
Needs scripts/build-llamacpp.sh first. Prints agreement and, where the top-1
differs, how far llama.cpp's reference probability of that token is below its top-1.
"""
import json, subprocess, sys, time, urllib.request, os, signal
model, ref, args = sys.argv[1], sys.argv[2], sys.argv[3:]
d=json.load(open(ref))
srv=subprocess.Popen(['.bench/llama.cpp/build/bin/llama-server','-m',model,'--port','18081','-t','2']+args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
for _ in range(100):
    try:
        urllib.request.urlopen('http://127.0.0.1:18081/health'); break
    except Exception: time.sleep(0.2)
agree=tot=0; gaps=[]
try:
    for pn,p in d['prompts'].items():
        base=p['prompt_ids_add_special_true']
        for i,pos in enumerate(p['positions']):
            toks=base+p['generated_ids'][:i]
            req=json.dumps({"prompt":toks,"n_predict":1,"temperature":0,"n_probs":10,"cache_prompt":False}).encode()
            r=json.load(urllib.request.urlopen(urllib.request.Request('http://127.0.0.1:18081/completion',data=req,headers={'Content-Type':'application/json'})))
            top=r['completion_probabilities'][0]['top_logprobs'][0]['id']
            tot+=1
            if top==p['generated_ids'][i]: agree+=1
            else:
                pl={t['id']:t['prob'] for t in pos['top10']}
                gaps.append(round(pos['top10'][0]['prob']-pl.get(top,0),3))
finally:
    srv.send_signal(signal.SIGTERM); srv.wait()
print(os.path.basename(model), args, 'agree', agree, 'of', tot, 'gaps', gaps)
