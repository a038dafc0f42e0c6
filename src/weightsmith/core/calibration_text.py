"""The built-in calibration text used when no ``--calib`` file is given.

About 5 KB of plain prose written for weightsmith (stories, explanations, dialogue, a little
code and arithmetic), so calibration runs anywhere without a download. It is small and generic:
pass ``--calib`` with text from the model's own domain for best results.
"""

BUILTIN_TEXT = """\
Once upon a time, in a small town by the sea, there lived a girl named Mia. Every morning she \
walked to the harbour to watch the fishing boats come home. One day she found a tiny crab stuck \
in a net. "Don't be scared," she said softly, and she lifted the net until the crab could run \
back into the water. Her grandfather smiled. "Kindness is never wasted," he told her.

The next week a storm came. The wind howled, the waves crashed over the wall, and the lights \
in the town went out. Mia and her grandfather lit candles and told stories until the sky grew \
quiet again. In the morning the beach was covered with shells, seaweed and pieces of wood, and \
the children of the town spent the whole day building a castle from everything they found.

Photosynthesis is the process by which plants, algae and some bacteria turn light into \
chemical energy. Inside the chloroplasts, chlorophyll absorbs mostly red and blue light. The \
energy splits water molecules, releasing oxygen, and drives the production of sugars from \
carbon dioxide. Almost all life on Earth depends, directly or indirectly, on this reaction.

A computer stores numbers in binary. An eight-bit byte can hold 256 different values, from 0 \
to 255. Four bits, sometimes called a nibble, hold sixteen values. When a neural network is \
quantized to four bits, each weight is replaced by one of sixteen levels, and a scale factor \
maps those levels back to real numbers. The art lies in choosing the levels so that the \
network's answers barely change.

"Where are you going?" asked Tom.
"To the library," said Sara. "I need a book about volcanoes for my project."
"Can I come with you? I want to read about dinosaurs."
"Of course. We can take the bus at ten o'clock and be back before lunch."

The history of the city goes back more than two thousand years. Traders arrived by river, \
built a wooden bridge and later a stone market hall. In the eighteenth century the old walls \
were torn down to make room for wide avenues, parks and a railway station. Today about 800,000 \
people live there, and the old market hall is a museum.

def mean(values):
    total = 0.0
    for v in values:
        total += v
    return total / len(values)

print(mean([3, 5, 7, 9]))  # prints 6.0

To make bread, mix 500 grams of flour with 10 grams of salt, 7 grams of yeast and 350 \
millilitres of warm water. Knead the dough for ten minutes until it is smooth, cover it and let \
it rise for an hour. Shape the loaf, let it rise again, then bake it at 220 degrees Celsius for \
about thirty-five minutes, until the crust is golden and sounds hollow when tapped.

The committee met on Tuesday to discuss the budget for next year. Several members argued that \
more money should go to public transport, while others wanted to repair the roads first. After \
a long debate they agreed on a compromise: the bus network would get two new routes, and the \
most damaged streets would be repaired before winter.

Little Ben had a red kite. Every afternoon he ran up the green hill and let the wind carry the \
kite high into the sky. One day the string broke and the kite flew away over the trees. Ben was \
sad, but his sister helped him build a new one from paper, sticks and a long ribbon for a tail. \
The new kite flew even higher than the old one, and Ben laughed all the way home.

Water boils at 100 degrees Celsius at sea level, but at lower temperatures on high mountains, \
because the air pressure is lower. That is why cooking pasta takes longer in the Alps. Salt \
raises the boiling point only slightly; cooks add it for taste, not to cook food faster.

In mathematics, a prime number is a whole number greater than one whose only divisors are one \
and itself. The first primes are 2, 3, 5, 7, 11, 13, 17, 19, 23 and 29. Euclid proved more than \
two thousand years ago that there are infinitely many of them: multiply any finite list of \
primes together, add one, and the result has a prime factor that is not in the list.

The old lighthouse keeper climbed the spiral stairs every evening, one hundred and twelve \
steps, to light the lamp. Ships far out at sea saw the beam sweep across the water and knew \
where the rocks were. When the lighthouse was finally automated, the keeper stayed in his \
cottage by the cliff, and every evening he still looked up to check that the light was on.
"""
