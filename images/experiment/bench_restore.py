"""Repeated restores from one template snapshot: median/min/max of exec->running and exec->first agent reply."""
import sys, os, time, statistics, subprocess
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cove_exp import *
machine = sys.argv[1] if len(sys.argv) > 1 else 'q35'
N = int(sys.argv[2]) if len(sys.argv) > 2 else 8
common = dict(machine=machine, mode='py', sandbox=SANDBOX_STRICT)
TPL_MEM = '/dev/shm/cove-bt'; STATE = EXP + '/bt.state'
for p in (TPL_MEM, STATE):
    if os.path.exists(p): os.unlink(p)
new_overlay('bt')
vm = VM('bt', **common)
vm.connect_agent()
vm.agent.settimeout(30); vm.agent.recv(100)
boot = vm.since()
vm.agent.close(); time.sleep(0.5)
snaps = []
dt, st = snapshot(vm, STATE, 'fd'); vm.quit()
print('%s: template booted (first agent data) in %.2fs; snapshot %.1f ms, state %d B, mem du %d MiB' % (
    machine, boot, dt * 1000, os.path.getsize(STATE), du_kib(TPL_MEM) >> 10))
res = {}
for variant in ('cp', 'cp-sparse', 'private'):
    runs, replies, copies = [], [], []
    for i in range(N):
        name = 'bn%d' % i
        new_overlay(name, backing=EXP + '/bt.qcow2')
        t = time.monotonic()
        mem = TPL_MEM
        if variant != 'private':
            mem = '/dev/shm/cove-' + name
            subprocess.run(['cp'] + (['--sparse=always'] if variant == 'cp-sparse' else []) + [TPL_MEM, mem], check=True)
        copies.append(time.monotonic() - t)
        v, trun, _ = restore(name, STATE, 'fd', mem_path=mem, share='off' if variant == 'private' else 'on', **common)
        v.connect_agent(); v.agent.sendall(b'echo x\n'); v.agent.settimeout(10); got = b''
        while b'echoed x' not in got:
            got += v.agent.recv(4096)
        replies.append(v.since()); runs.append(trun)
        v.quit()
        if mem != TPL_MEM: os.unlink(mem)
        os.unlink(EXP + '/' + name + '.qcow2')
    f = lambda xs: 'median %5.1f min %5.1f max %5.1f' % (statistics.median(xs) * 1000, min(xs) * 1000, max(xs) * 1000)
    print('  %-9s copy: %s | exec->running: %s | exec->agent echo: %s  (ms, n=%d)' % (variant, f(copies), f(runs), f(replies), N))
