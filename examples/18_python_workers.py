# Lesson 18's Python side: hands work to C++ workers through an mp manager's queues and reads
# the results back. Plain multiprocessing code, unchanged from talking to a Python manager.
import sys
from multiprocessing.managers import BaseManager

class QueueManager(BaseManager): pass
QueueManager.register('get_tasks')
QueueManager.register('get_results')

host, port, key = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
m = QueueManager(address=(host, port), authkey=key)
m.connect()
tasks, results = m.get_tasks(), m.get_results()
for n in range(8):
    tasks.put({'n': n, 'word': 'job%d' % n})
for n, square, worker in sorted(results.get(timeout=30) for _ in range(8)):
    print('python: %d squared is %d (by C++ worker %d)' % (n, square, worker))
