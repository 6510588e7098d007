"""(a): cold boot to the first message on the virtio-serial agent port, per machine type / TCG threading."""
import os, sys, time; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cove_exp import *
for label, kw in [('microvm-st', dict(machine='microvm', accel='tcg')), ('q35-mt', dict(machine='q35', accel='tcg,thread=multi')),
                  ('q35-st', dict(machine='q35', accel='tcg')),
                  ('microvm', dict(machine='microvm', accel='tcg,thread=multi'))]:
    name = 'boot-' + label
    new_overlay(name)
    try: os.unlink('/dev/shm/cove-' + name)
    except FileNotFoundError: pass
    vm = VM(name, **kw)
    try:
        vm.connect_agent()
        t_conn = vm.since()
        line = vm.readline(60)
        t_first = vm.since()
        line2 = vm.readline(10)
        print('%-8s first agent msg %.3fs after exec (agent sock connected at %.3fs): %r then %r' % (label, t_first, t_conn, line, line2))
    except Exception as e:
        print(label, 'FAILED', repr(e)); print(vm.console()[-1500:]); print(vm.stderr())
    vm.quit()

