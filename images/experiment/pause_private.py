"""A sandbox restored with share=off (private mapping of the template memory): what does pausing it cost?
RAM is then not 'shared', so x-ignore-shared does not skip it: the whole RAM goes into the migration stream."""
import sys, os, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cove_exp import *
common = dict(machine='q35', mode='py', sandbox=SANDBOX_STRICT)
TPL_MEM = '/dev/shm/cove-bt'; STATE = EXP + '/bt.state'   # from bench_restore.py
new_overlay('pp', backing=EXP + '/bt.qcow2')
vm, trun, _ = restore('pp', STATE, 'fd', mem_path=TPL_MEM, share='off', **common)
time.sleep(2)
st_path = EXP + '/pp.state'
dt, st = snapshot(vm, st_path, 'fd')
vm.quit()
print('pause of share=off sandbox: %.1f ms, state file %.1f MiB, ram: transferred %s normal %s duplicate(zero) %s' % (
    dt * 1000, os.path.getsize(st_path) / 2**20, st['ram']['transferred'], st['ram']['normal'], st['ram']['duplicate']))
# resume it (fresh anonymous RAM, no memory file needed except as a placeholder backend)
new_overlay('pp2', backing=EXP + '/pp.qcow2')
for m in ('/dev/shm/cove-pp2',):
    if os.path.exists(m): os.unlink(m)
vm2, trun2, _ = restore('pp2', st_path, 'fd', mem_path='/dev/shm/cove-pp2', share='off', **common)
vm2.connect_agent(); vm2.agent.sendall(b'echo y\n'); vm2.agent.settimeout(10); got = b''
while b'echoed y' not in got: got += vm2.agent.recv(4096)
print('resume from full-RAM state: running %.1f ms, agent echo %.1f ms after exec' % (trun2 * 1000, vm2.since() * 1000))
vm2.quit()
os.unlink('/dev/shm/cove-pp2')
