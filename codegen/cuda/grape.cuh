// grape: placeholder, to be written
#pragma once
