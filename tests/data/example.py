import os
import sys


class Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y

    def norm(self):
        return (self.x ** 2 + self.y ** 2) ** 0.5


def read_lines(path):
    with open(path) as f:
        return [line.rstrip("\n") for line in f]


def main(argv):
    lines = read_lines(argv[1])
    for line in lines:
        pri
